"""What the routes share for one app: settings, metrics and the engine (absent while the model loads)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import Request

from server.config import Settings
from server.errors import APIError, model_not_found, unavailable
from server.metrics import Metrics

# Turns a request's `adaptation` object, prompt ids and requested model into what the engine carries
# per sequence. The default keeps the base weights; the app installs the expert resolver.
AdaptationResolver = Callable[[dict | None, list[int], str | None], Awaitable[Any]]


async def base_weights(spec: dict | None, prompt_ids: list[int], model: str | None = None) -> Any:
    return None


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Any = None  # an AsyncEngine once loaded and started
    load_error: str | None = None  # why loading failed, if it did
    resolve_adaptation: AdaptationResolver = base_weights
    registry: Any = None  # experts.registry.ExpertRegistry once the model is loaded
    store: Any = None  # experts.store.ExpertStore that writes to the registry (once the model is loaded)
    store_watcher: Any = None  # experts.store_watcher.StoreWatcher: other replicas' writes to a shared store
    jobs: Any = None  # experts.jobs.JobBoard of background adaptation jobs (created on first use)
    started: int = field(default_factory=lambda: int(time.time()))  # the models' `created`

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
