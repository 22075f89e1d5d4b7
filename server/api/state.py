"""What the routes share for one app: settings, metrics, the engine (absent while the model loads) and the
thread pool that tokenizes."""
from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request

from engine.contract import Engine
from experts.pass1.resolver import Resolver
from experts.store.expert_store import ExpertStore
from experts.store.registry import ExpertRegistry
from experts.store.watcher import StoreWatcher
from server.admission import ClientGate, client_limits
from server.config import Settings
from server.errors import APIError, model_not_found, unavailable
from server.jobs import Job, JobBoard
from server.metrics import Metrics
from server.prompts import longest_token_chars


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None  # once loaded and started
    load_error: str | None = None  # why loading failed, if it did
    on_load_failure: Callable[[], None] | None = None  # t2serve serve: stop (exit 1) rather than 503 forever
    resolver: Resolver | None = None  # pass 1, once the experts are attached to the engine
    registry: ExpertRegistry | None = None  # given to create_app, or filled from the store at load
    store: ExpertStore | None = None  # writes to the registry (once the model is loaded)
    store_watcher: StoreWatcher | None = None  # other replicas' writes to a shared store
    jobs: JobBoard = field(default_factory=JobBoard)  # background jobs (few-shot searches, SAPT training)
    started: int = field(default_factory=lambda: int(time.time()))  # the models' `created`
    gate: ClientGate = field(init=False)  # each client's share of the slots and the queue
    # Tokenizing and detokenizing requests' text: threads of their own, so that neither the event loop nor
    # the default pool (file work, grammar compilation) waits behind a long text.
    tokenizer_pool: ThreadPoolExecutor = field(init=False)
    _char_limit: tuple[Any, int] | None = field(default=None, init=False)  # (engine, its input_char_limit)

    def __post_init__(self) -> None:
        s = self.settings
        self.gate = ClientGate(*client_limits(s.client_share, s.max_num_seqs, s.max_waiting))
        self.tokenizer_pool = ThreadPoolExecutor(s.tokenizer_threads, thread_name_prefix="t2-tokenize")

    async def tokenizing(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run in the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, functools.partial(fn, *args))

    async def input_char_limit(self, engine) -> int:
        """The most characters a prompt may have: ``max_input_chars``, or what can fit in the model's
        length (found once per engine, in the pool: it reads the whole vocabulary)."""
        if self.settings.max_input_chars is not None:
            return self.settings.max_input_chars
        if self._char_limit is None or self._char_limit[0] is not engine:
            longest = await self.tokenizing(longest_token_chars, engine.tokenizer)
            self._char_limit = (engine, engine.max_model_len * longest)
        return self._char_limit[1]

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready)

    def not_ready_error(self) -> APIError:
        if self.load_error is not None:
            return unavailable(f"The model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            return unavailable("The model is still loading; retry shortly.", code="model_loading")
        return unavailable("The engine is not running.", code="engine_dead")


def server_state(request: Request) -> ServerState:
    return request.app.state.t2


def ready_engine(request: Request):
    """The running engine, or a 503 in the OpenAI error shape."""
    state = server_state(request)
    if not state.ready:
        raise state.not_ready_error()
    return state.engine


def check_model(engine, requested: str | None, registry=None) -> str:
    """The name answered in `model`: the served model or a registered expert; 404 otherwise."""
    if requested is None or requested == engine.model_name:
        return engine.model_name
    if registry is not None and requested in registry:
        return requested
    raise model_not_found(requested)


def job_of_kind(request: Request, job_id: str, kind: str, what: str) -> Job:
    """The job ``job_id`` if it is of ``kind``; 404 naming ``what`` otherwise."""
    job = server_state(request).jobs.get(job_id)
    if job is None or job.kind != kind:
        raise APIError(404, f"no {what} job {job_id!r}", code="not_found", param="job_id")
    return job


async def cancel_job(request: Request, job_id: str, kind: str, what: str) -> dict:
    """Cancel a job of ``kind`` (404 if there is none); its view, with whether it was still running."""
    job = job_of_kind(request, job_id, kind, what)
    cancelled = await server_state(request).jobs.cancel(job_id)
    return {**job.view(), "cancelled": cancelled}
