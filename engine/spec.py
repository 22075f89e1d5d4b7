"""What an engine is built from: small typed specs, built once at the edge (``server.config.Settings``
turns its flat settings into them), so no settings object travels into the engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ENGINES = ("native", "vllm")


class EngineUnavailableError(RuntimeError):
    """The configured engine cannot run on this machine (missing package or GPU). Defined here, not in
    ``engine.factory``, so the command line can catch it without importing torch."""


def default_cache_dir() -> Path:
    """Converted models, SVD factors and (by default) the expert store: ``T2_CACHE_DIR`` or ~/.cache/t2serve."""
    return Path(os.environ.get("T2_CACHE_DIR") or Path.home() / ".cache" / "t2serve")


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load, where, and which of its matrices experts adapt."""

    model: str | None = None  # a local Hugging Face folder or .gguf file; None = the embedded SmolLM2
    served_model_name: str | None = None  # the name clients use; default from the path
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: Path = field(default_factory=default_cache_dir)  # converted models, SVD factors
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's choice)
    adapt_targets: str = "mlp"  # mlp | attn | all | none | comma-separated module names


@dataclass(frozen=True)
class VLLMSpec:
    """The vLLM engine's own settings (``vllm_*`` in the server settings)."""

    svf: bool = True  # False: W kept, no SVD, SVF experts refused (the SAPT bank alone; the base at full speed)
    sapt_bank: int = 64  # the SAPT bank's width: total rank (tasks x r) of the bundles loaded at once (0: none)
    max_experts: int = 256  # SVF experts kept on the GPU (LRU)
    tensor_parallel_size: int = 1  # GPUs one engine spreads the model over
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False  # no CUDA graphs
    structured_backend: Literal["guidance", "xgrammar"] = "guidance"  # vLLM's grammar engine


@dataclass(frozen=True)
class EngineSpec:
    """Which engine, on which model, with which scheduling limits."""

    model: ModelSpec = field(default_factory=ModelSpec)
    engine: Literal["native", "vllm"] = "native"
    max_num_seqs: int = 32  # sequences decoded together in one step
    max_waiting: int = 256  # queued requests beyond this are refused (QueueFullError)
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    max_prefill_tokens: int = 2048  # prompt tokens admitted in one prefill forward (native engine)
    grammar_mask_ms: float | None = 20.0  # native engine: a row whose grammar mask takes longer, twice running, ends
    vllm: VLLMSpec = field(default_factory=VLLMSpec)


def spec_from(cls: type, source: Any, prefix: str = "", **given: Any):
    """An instance of the dataclass ``cls`` whose fields are read from ``source``'s attributes of the same
    name (``prefix + name`` first), ``given`` overriding; fields ``source`` lacks keep their defaults."""
    values = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(source, prefix + f.name):
            values[f.name] = getattr(source, prefix + f.name)
        elif hasattr(source, f.name):
            values[f.name] = getattr(source, f.name)
    return cls(**values)
