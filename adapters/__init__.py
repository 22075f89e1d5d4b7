"""The math of adapting a base model to a request.

Pure tensor code and module surgery: SVD factors, SVF composition, SAPT/LoRA mixtures, the adaptive
linear layer and target discovery. Nothing here does HTTP or reads expert files; callers hand in
tensors and get tensors (or adapted modules) back.

Engine-facing contract (see ``runtime.py``): ``install(model, targets, svd_cache_dir)`` once at start
returns the ``AdaptationRuntime``; the engine asks ``plan(rows)`` for a per-step table describing which
``Adaptation`` each batch row carries, and runs its forward inside ``activate(table)``.
"""
from adapters.adaptation import Adaptation, SAPTWeights, SVFExpert, SVFMixture
from adapters.install import install
from adapters.runtime import AdaptationRuntime, StepTable
from adapters.sapt import SAPTBundle
from adapters.targets import Target, find_targets

__all__ = [
    "Adaptation", "AdaptationRuntime", "SAPTBundle", "SAPTWeights", "StepTable", "SVFExpert",
    "SVFMixture", "Target", "find_targets", "install",
]
