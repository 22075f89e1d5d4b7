"""Load the base model for training or evaluation, with the adaptive layers installed.

Standalone on purpose: no server settings, pydantic or FastAPI, so ``python -m experts.train`` runs on a
machine that has only torch, transformers, safetensors and numpy. The model argument is what the
server takes: a Hugging Face folder, a .gguf file (needs the ``gguf`` package), or nothing for the
embedded SmolLM2.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters import AdaptationRuntime, install
from engine.loader import resolve_device, resolve_dtype, resolve_model_folder
from engine.spec import default_cache_dir

log = logging.getLogger("t2serve.train")


@dataclass
class BaseModel:
    model: torch.nn.Module  # eval mode, weights frozen, adaptive layers installed
    tokenizer: object
    runtime: AdaptationRuntime
    name: str  # served name (informational, goes into expert records)
    folder: Path
    device: torch.device
    dtype: torch.dtype


def load_base(model: str | None = None, *, device: str = "auto", dtype: str = "auto", targets: str = "mlp",
              cache_dir: str | Path | None = None, threads: int | None = None) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder, name = resolve_model_folder(model, cache)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation="sdpa").to(dev).eval()
    net.requires_grad_(False)
    runtime = install(net, targets, cache / "svd", progress=False)
    log.info("loaded %s (%s, %s, %d %s targets) in %.1f s", folder, dev, dt, len(runtime.targets), targets,
             time.time() - t0)
    return BaseModel(net, tok, runtime, name, folder, dev, dt)
