"""The engine contract the HTTP layer, pass 1 and few-shot adaptation rely on, and the choice of engine.

Two engines satisfy it: the native one (``async_engine.AsyncEngine``: CPU or one GPU, exact per-row
mixtures) and vLLM (``vllm_backend.engine.VLLMEngine``: paged attention, CUDA graphs, tensor
parallelism; the optional extra ``.[vllm]`` and a CUDA GPU). ``check_engine_available`` runs when the
app is created, so that asking for vLLM where it cannot run is one clear error at start.
"""
from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, AsyncIterator, Callable, Protocol, runtime_checkable

from server.engine.types import GenerationRequest, RequestOutput

ENGINES = ("native", "vllm")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM's kernels are built for


@runtime_checkable
class Engine(Protocol):
    """What callers may use of an engine. Requests are token ids in, ``RequestOutput``s out."""

    tokenizer: Any  # the model's Hugging Face tokenizer
    model_name: str  # the name clients use
    max_model_len: int  # prompt + generated tokens per sequence
    eos_token_ids: list[int]
    runtime: Any  # validates adaptations (``validate``), knows the targets; None without adapted matrices
    model: Any  # the base model's weights as a torch module (fingerprints, SAPT embeddings), or None

    @property
    def ready(self) -> bool:
        """True while requests can be served."""

    def start(self) -> None:
        """Start serving (from the event loop that will consume the outputs)."""

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work, abort what is in flight, release the model."""

    def stats(self) -> dict:
        """At least ``running`` and ``waiting`` (sequences), read by the metrics endpoint."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue ``request``; raise at once (QueueFullError, PromptTooLongError, EngineDeadError) if it
        cannot be; otherwise its outputs, the last one ``finished``. Leaving early aborts it. A request
        with ``score`` generates nothing and answers once, with ``scores``."""

    async def abort(self, request_id: str) -> None:
        """End a request early; its stream ends with finish reason "abort"."""


async def stream_outputs(q: asyncio.Queue, on_exit: Callable[[bool], None]) -> AsyncIterator[RequestOutput]:
    """The outputs an engine thread puts into ``q``, up to the finished one. ``on_exit(finished)`` runs
    however the consumer leaves (``finished`` False: it left early and the request is to be aborted)."""
    finished = False
    try:
        while not finished:
            out: RequestOutput = await q.get()
            finished = out.finished
            yield out
    finally:
        on_exit(finished)


class EngineUnavailableError(RuntimeError):
    """The configured engine cannot run on this machine (missing package or GPU)."""


def check_engine_available(settings) -> None:
    """Raise EngineUnavailableError, with what to do about it, when ``settings.engine`` cannot run here."""
    name = getattr(settings, "engine", "native")
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


def load_engine(settings) -> Engine:
    """Build the configured engine (loads the model; blocking: call it off the event loop)."""
    check_engine_available(settings)
    if settings.engine == "vllm":
        from server.engine.vllm_backend.engine import VLLMEngine

        return VLLMEngine.from_settings(settings)
    from server.engine.async_engine import AsyncEngine

    return AsyncEngine.from_settings(settings)
