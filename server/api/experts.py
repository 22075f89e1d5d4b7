"""The expert API: ``POST /v1/experts`` (store a new expert or a new version), ``GET /v1/experts``,
``GET /v1/experts/{name}``, ``GET /v1/experts/{name}/content`` (the stored safetensors) and
``DELETE /v1/experts/{name}``.

Uploads and deletions take the admin key when one is configured (``auth.require_admin_key``); an
uploaded expert is in the registry, so served by the very next request, when the POST answers; a
deleted one is gone from it when the DELETE answers. Parsing and validation (tensors, fsync) run in
a worker thread, never on the event loop.
"""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from experts.store.errors import ExpertError, not_found
from experts.store.expert_store import ExpertStore
from experts.store.records import check_name
from experts.store.stored import StoredExpert
from experts.store.uploads import Upload, to_draft
from server.api.auth import require_admin_key, require_read_key
from server.api.expert_uploads import FILE_FIELDS, ExpertUpload, read_upload
from server.api.serving import ERROR_RESPONSES
from server.api.state import ready_engine, server_state
from server.errors import APIError, unavailable

router = APIRouter(tags=["experts"])
RESPONSES = {**ERROR_RESPONSES, **{s: ERROR_RESPONSES[400] for s in (403, 409, 415)}}


class ExpertCard(BaseModel):
    id: str  # the expert's name (requests put it in `model`)
    object: Literal["expert"] = "expert"
    kind: str  # svf | mixture | sapt
    category: str | None = None
    description: str = ""
    version: int
    created: int
    sha256: str  # of the stored tensor file
    bytes: int
    parametrization: str | None = None
    targets: list[str]
    parent: str | None = None  # the base model it adapts
    base_fingerprint: str | None = None
    source: str
    status: Literal["ready", "incompatible", "unavailable"]
    status_reason: str | None = None
    spec: dict[str, Any] = {}  # mixture: experts, weights; sapt: num_tasks, rank, lora_alpha, shapes


class QuarantinedExpert(BaseModel):
    """Committed versions found damaged (record or tensors not matching) at a start: not served, kept."""
    name: str
    versions: dict[str, str]  # version number -> why it is unusable
    quarantined: int | None  # Unix seconds
    path: str  # folder in the store holding the files


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertCard]
    quarantined: list[QuarantinedExpert] = []


class ExpertDeleted(BaseModel):
    id: str
    object: Literal["expert.deleted"] = "expert.deleted"
    deleted: bool = True


def _card(s: StoredExpert, parent: str) -> ExpertCard:
    r = s.record
    return ExpertCard(id=r.name, kind=r.kind, category=r.category, description=r.description, version=r.version,
                      created=r.created, sha256=r.sha256, bytes=r.size, parametrization=r.parametrization,
                      targets=list(r.targets), parent=parent, base_fingerprint=r.base_fingerprint, source=r.source,
                      status=s.status, status_reason=s.reason, spec=dict(r.spec))


def _store(request: Request) -> tuple[ExpertStore, str]:
    engine = ready_engine(request)  # 503 while the model loads: experts are validated against it
    store = server_state(request).store
    if store is None:
        raise unavailable("The expert store is not open yet; retry shortly.", code="model_loading")
    return store, engine.model_name


def _api_error(e: ExpertError, upload: Upload | None = None) -> APIError:
    """The HTTP answer; ``param`` says where in this request the problem is."""
    param = e.param
    if param == "tensors" and upload is not None:
        param = "file" if upload.multipart else ("weights" if upload.meta.kind == "mixture" else "z")
    elif param and upload is not None and upload.multipart and param not in (*FILE_FIELDS, "metadata"):
        param = f"metadata.{param}"  # metadata fields of a multipart upload
    kind = "server_error" if e.status >= 500 else "invalid_request_error"  # 503 store_busy: retry later
    return APIError(e.status, e.message, type=kind, param=param, code=e.code)


def _name(name: str) -> str:
    try:
        return check_name(name)
    except ExpertError as e:
        raise _api_error(e) from e


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ExpertUpload.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["metadata"], "properties": {
        "metadata": {"type": "string", "description": "ExpertUpload as JSON, without z"},
        "file": {"type": "string", "format": "binary"},
        "config": {"type": "string", "format": "binary"},
        "lora_weights_A": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "lora_weights_B": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "trans_input": {"type": "string", "format": "binary"},
        "prompts_keys_till_now": {"type": "string", "format": "binary"}}}}}}}


@router.post("/v1/experts", response_model=ExpertCard, responses=RESPONSES, openapi_extra=_UPLOAD_DOC,
             dependencies=[Depends(require_admin_key)])
async def create_expert(request: Request) -> ExpertCard:
    """Store an expert (a replacement becomes its next version); it is served once this answers."""
    store, parent = _store(request)
    upload = await read_upload(request, store.max_bytes)

    def work() -> StoredExpert:
        return store.put(to_draft(upload, store))

    try:
        stored = await asyncio.to_thread(work)
    except ExpertError as e:
        raise _api_error(e, upload) from e
    return _card(stored, parent)


@router.get("/v1/experts", response_model=ExpertList, responses=RESPONSES, dependencies=[Depends(require_read_key)])
async def list_experts(request: Request) -> ExpertList:
    store, parent = _store(request)
    quarantined = await asyncio.to_thread(store.quarantined)
    return ExpertList(data=[_card(s, parent) for s in store.list()], quarantined=quarantined)


@router.get("/v1/experts/{name}", response_model=ExpertCard, responses=RESPONSES,
            dependencies=[Depends(require_read_key)])
async def get_expert(name: str, request: Request) -> ExpertCard:
    store, parent = _store(request)
    s = store.get(_name(name))
    if s is None:
        raise _api_error(not_found(name))
    return _card(s, parent)


@router.get("/v1/experts/{name}/content", responses={200: {"content": {"application/octet-stream": {}}}, **RESPONSES},
            dependencies=[Depends(require_admin_key)])
async def expert_content(name: str, request: Request) -> Response:
    """The current version's tensors as stored (safetensors); its record is the expert's card."""
    store, _ = _store(request)
    try:
        record, data = await asyncio.to_thread(store.read_file, _name(name))
    except ExpertError as e:
        raise _api_error(e) from e
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{record.name}.v{record.version}.safetensors"',
        "X-Expert-Version": str(record.version), "X-Expert-Sha256": record.sha256})


@router.delete("/v1/experts/{name}", response_model=ExpertDeleted, responses=RESPONSES,
               dependencies=[Depends(require_admin_key)])
async def delete_expert(name: str, request: Request) -> ExpertDeleted:
    """Delete every version; requests stop using the expert at once (ones in flight finish with theirs)."""
    store, _ = _store(request)
    try:
        await asyncio.to_thread(store.delete, _name(name))
    except ExpertError as e:
        raise _api_error(e) from e
    return ExpertDeleted(id=name)
