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


def _expert_cards(request: Request) -> list[ModelCard]:
    """Experts are listed as models whose `parent` is the base model (the convention of vLLM's LoRA)."""
    engine, state = ready_engine(request), server_state(request)
    if state.registry is None:
        return []
    return [ModelCard(id=e.name, created=int(e.meta.get("created", state.started)), parent=engine.model_name,
                      max_model_len=engine.max_model_len) for e in state.registry.entries()]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request), *_expert_cards(request)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> ModelCard:
    name = check_model(ready_engine(request), model, server_state(request).registry)
    if name != ready_engine(request).model_name:
        return next(c for c in _expert_cards(request) if c.id == name)
    return _card(request)
