"""Which engine serves: the native one (``engine.native``: CPU or one GPU, exact per-row mixtures) or vLLM
(``engine.vllm``: paged attention, CUDA graphs, tensor parallelism; the optional extra ``.[vllm]`` and a
CUDA GPU). ``check_engine_available`` runs when the app is created, so that asking for vLLM where it
cannot run is one clear error at start.
"""
from __future__ import annotations

import asyncio
import importlib.util

from engine.contract import Engine
from engine.spec import ENGINES, EngineSpec, EngineUnavailableError


def check_engine_available(name: str) -> None:
    """Raise EngineUnavailableError, with what to do about it, when the engine ``name`` cannot run here."""
    if name not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise EngineUnavailableError(
            "--engine vllm needs vLLM, which is not installed: pip install 't2serve[vllm]' "
            "(offline: see 'Running with vLLM' in the README), or use --engine native")
    import torch

    if not torch.cuda.is_available():
        raise EngineUnavailableError("--engine vllm needs a CUDA GPU and none is visible; use --engine native")


def load_engine(spec: EngineSpec, loop: asyncio.AbstractEventLoop | None = None) -> Engine:
    """Build the engine ``spec`` asks for (loads the model; blocking: call it off the event loop).
    ``loop``: the running loop its callers will use (a server's); the vLLM engine runs vLLM on it, so
    outputs reach callers without a hop between threads."""
    check_engine_available(spec.engine)
    if spec.engine == "vllm":
        from engine.vllm.engine import VLLMEngine

        return VLLMEngine.from_spec(spec, loop=loop)
    from engine.native.async_engine import AsyncEngine

    return AsyncEngine.from_spec(spec)
