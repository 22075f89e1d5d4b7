"""The FastAPI application: ``create_app(settings, engine=None)``.

The server accepts connections at once and loads the model in the background: /health answers 503
until the engine runs, then 200. Loading (seconds to a minute: GGUF conversion on first start) runs
in a worker thread so the event loop keeps answering meanwhile. A test or an embedding program can
hand in an engine instead; the app starts it on its event loop and shuts it down with the app.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from engine.contract import Engine
from engine.factory import check_engine_available, load_engine
from experts.pass1.resolver import Resolver
from experts.store.base_model import BaseModelInfo
from experts.store.expert_store import ExpertStore
from experts.store.registry import ExpertRegistry
from experts.store.shipped import install_shipped
from experts.store.watcher import StoreWatcher
from server.api import api_router
from server.api.middleware import AuthGate, BodyLimitMiddleware, RequestMetricsMiddleware
from server.api.state import ServerState
from server.api.training import end_leftover_training
from server.config import Settings
from server.errors import install_error_handlers

log = logging.getLogger("t2serve.http")

DESCRIPTION = """An OpenAI-compatible server that adapts its base model to each request.

Requests and responses follow the OpenAI API; extensions live in the request's `adaptation` object
and `top_k`. Errors always have the shape `{"error": {"message", "type", "param", "code"}}`.
"""


async def _load_engine(state: ServerState) -> None:
    started = time.time()
    try:
        engine = await asyncio.to_thread(load_engine, state.settings.engine_spec(), asyncio.get_running_loop())
    except Exception as e:
        _load_failed(state, "loading the model failed", e)
        return
    engine.start()
    try:  # reading and validating the experts is start-up work too: off the event loop
        await asyncio.to_thread(attach_experts, state, engine)
    except Exception as e:
        _load_failed(state, "opening the expert store failed", e)
        await engine.shutdown()
        return
    state.engine = engine
    state.metrics.model_name = engine.model_name  # the model_name label of vLLM's metric names
    log.info("model %s loaded; serving", engine.model_name)
    if state.settings.cache_max_gb is not None:
        await asyncio.to_thread(_cap_cache, state.settings, started)


def _cap_cache(settings, started: float) -> None:
    """Evict the least recently used cache entries beyond ``cache_max_gb``; what this server loaded (used
    since it started) stays."""
    from engine.cache import entries, human, prune

    root = settings.cache_dir
    in_use = tuple(e.path for e in entries(root) if e.used >= started - 1)
    removed = prune(root, max_bytes=int(settings.cache_max_gb * 1e9), keep=in_use,
                    expert_dir=settings.resolved_expert_dir())
    for e in removed:
        log.info("cache over %s GB: removed %s %s (%s)", settings.cache_max_gb, e.kind, e.path, human(e.size))


def _load_failed(state: ServerState, what: str, e: Exception) -> None:
    """Record why; then either keep answering 503 (an embedding program decides) or, given
    ``on_load_failure`` (``t2serve serve``: stop the server, then exit 1), call it."""
    state.load_error = f"{type(e).__name__}: {e}"
    if state.on_load_failure is not None:
        log.error("%s: %s", what, state.load_error.splitlines()[0])
        state.on_load_failure()
    else:
        log.exception("%s; /health stays 503", what)


def attach_experts(state: ServerState, engine: Engine) -> None:
    """Open the expert store (validated against the engine's model), fill the registry from it, and
    decide requests' adaptations against the registry. A registry handed to create_app is used as is."""
    if state.store is None:
        given = state.registry is not None
        registry = state.registry if given else ExpertRegistry()
        settings = state.settings
        store = ExpertStore(settings.resolved_expert_dir(), registry, BaseModelInfo.from_engine(engine),
                            max_bytes=settings.max_expert_bytes, lock_timeout=settings.store_lock_timeout)
        if not given:
            store.load()
            if settings.shipped_experts:
                install_shipped(store)
            if settings.store_poll_interval > 0:  # replicas sharing the folder: serve each other's writes
                state.store_watcher = StoreWatcher(store, settings.store_poll_interval).start()
        state.registry, state.store = registry, store
        log.info("%d expert(s) registered", len(registry))
    state.resolver = Resolver(state.registry, engine, state.settings.default_strategy, state.store,
                              adaptation_wait_s=state.settings.adaptation_wait_s)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.t2
    await end_leftover_training(state)  # before any new job can start beside a leftover
    loading = None
    if state.engine is not None:
        state.engine.start()  # the engine thread hands outputs to this loop
        attach_experts(state, state.engine)
    else:
        loading = asyncio.create_task(_load_engine(state))
    try:
        yield
    finally:
        if loading is not None and not loading.done():
            loading.cancel()  # the loader thread itself finishes on its own; its result is dropped
            await asyncio.gather(loading, return_exceptions=True)
        if state.store_watcher is not None:
            await asyncio.to_thread(state.store_watcher.stop)
        await state.jobs.cancel_all()  # few-shot searches: stopped before the engine they run on
        if state.engine is not None:
            await state.engine.shutdown()
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)


def create_app(settings: Settings | None = None, engine: Engine | None = None, *,
               registry: ExpertRegistry | None = None, on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The app for ``settings``; with ``engine`` given, serve that engine instead of loading one.
    ``registry`` (an ExpertRegistry) replaces the one loaded from the expert directory."""
    settings = settings or Settings()
    if engine is None:
        check_engine_available(settings.engine)  # e.g. --engine vllm without vLLM: one clear error now, not at load
    state = ServerState(settings, engine=engine, registry=registry, on_load_failure=on_load_failure)
    app = FastAPI(title="t2serve", version="0.1.0", description=DESCRIPTION, lifespan=_lifespan)
    app.state.t2 = state
    install_error_handlers(app)
    app.include_router(api_router())
    # The last added is the outermost: metrics see every answer; keys are checked before any body is read;
    # then the body limit of the route (expert uploads may be larger: SAPT bundles; multipart adds a little).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout=settings.body_read_timeout,
                       max_pending=settings.max_pending_body_bytes,
                       route_limits={"/v1/experts": max(settings.max_body_bytes, settings.max_expert_bytes + 65536),
                                     "/v1/adaptations": min(settings.max_body_bytes, 1 << 20),
                                     "/v1/training": 64 * 1024})
    app.add_middleware(AuthGate, settings=settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    if settings.cors_origins:  # outermost: browsers' preflight requests carry no key and get their answer here
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After"])
    return app
