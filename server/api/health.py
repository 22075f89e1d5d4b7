"""GET /health: 200 once the model is loaded and the engine runs, 503 (OpenAI error shape) before that
or after the engine has stopped. Not behind the API key: load balancers and probes call it. Its
``adaptation`` says how far the adaptive layers are (base requests are served before they are):
``{"phase": "svd", "percent": 40.0, "matrices": 90, "eta_s": 130}``, then ``{"phase": "ready", ...}``."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.serving import ERROR_RESPONSES
from server.api.state import ready_engine

router = APIRouter(tags=["operations"])


@router.get("/health", responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> dict:
    engine = ready_engine(request)
    return {"status": "ok", "model": engine.model_name, "adaptation": dict(engine.adaptation)}
