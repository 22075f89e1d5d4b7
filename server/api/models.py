"""GET /v1/models and /v1/models/{model}: the one served model."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key
from server.api.serving import ERROR_RESPONSES
from server.api.state import check_model, ready_engine, server_state
from server.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


def _card(request: Request) -> ModelCard:
    engine = ready_engine(request)
    return ModelCard(id=engine.model_name, created=server_state(request).started, max_model_len=engine.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> ModelCard:
    check_model(ready_engine(request), model)
    return _card(request)
