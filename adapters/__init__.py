"""The math of adapting a base model to a request.

Pure tensor code and module surgery: SVD factors, SVF composition, SAPT/LoRA mixtures, the adaptive
linear layer and target discovery. Nothing here does HTTP or reads expert files; callers hand in
tensors and get tensors (or adapted modules) back.

Engine-facing contract (see ``runtime.py``): the engine asks ``plan(rows)`` for a per-step table
describing which adaptation each batch row carries, and runs its forward inside ``activate(table)``.
"""
from adapters.runtime import AdaptationRuntime, StepTable

__all__ = ["AdaptationRuntime", "StepTable"]
