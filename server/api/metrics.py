"""GET /metrics: Prometheus text format. Not behind the API key, as scrapers expect."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.state import server_state
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = server_state(request)
    engine = state.engine
    state.metrics.observe_engine(engine.stats() if engine is not None else None, state.ready,
                                 engine.model_name if engine is not None else None)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
