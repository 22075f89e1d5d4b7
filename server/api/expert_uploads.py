"""The body of ``POST /v1/experts``, read and validated, then turned into an ``ExpertDraft`` for the store
by ``experts.store.uploads`` (which the CLI uses too).

Two shapes:
- ``application/json``: an ``ExpertUpload`` object; small SVF experts carry ``z`` as lists of numbers
  ({module name: [k values]}), mixtures name their experts and weights.
- ``multipart/form-data``: a ``metadata`` part (the same object as JSON, without ``z``) and files:
  ``file`` (safetensors, or the ``.pt`` of ``policy_params`` / ``learnable_params``, or PEFT's
  ``adapter_model.safetensors``), ``config`` (PEFT's ``adapter_config.json``), and for
  ``sapt_reference`` one ``lora_weights_A`` and ``lora_weights_B`` per task (task order) plus
  ``trans_input`` and ``prompts_keys_till_now``.
``format`` says which: ``safetensors`` (default, this server's own layout) or an importer's format.
A ``.pt`` is only ever opened by the importers, with ``weights_only=True``; a pickle sent as
``safetensors`` is refused by its magic bytes.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from experts.store.expert_store import too_large
from experts.store.uploads import Upload, UploadMetadata
from server.errors import APIError, invalid_request, validation_error

FILE_FIELDS = ("file", "config", "lora_weights_A", "lora_weights_B", "trans_input", "prompts_keys_till_now")
MAX_FILES = 2 * 64 + 4  # sapt_reference: two files per task, 64 tasks


class ExpertUpload(BaseModel):
    """An expert to store (a new name, or a new version of an existing one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., max_length=64, description="expert name: letters, digits, '.', '_', '-'")
    kind: Literal["svf", "mixture", "sapt"] = "svf"
    category: str | None = Field(None, max_length=32, description="what pass 1 dispatches on: math, code, ...")
    description: str = Field("", max_length=1000)
    format: Literal["safetensors", "policy_params", "learnable_params", "peft", "sapt_reference"] = "safetensors"
    parametrization: Literal["sakana", "direct"] = "sakana"
    targets: list[str] | None = Field(None, description="svf: the matrices z must cover exactly (optional)")
    base_fingerprint: str | None = Field(None, max_length=64, description="the base model it was made for")
    z: dict[str, list[float]] | None = Field(None, description="svf over JSON: {module name: z values}")
    experts: list[str] | dict[str, float] | None = Field(None, description="mixture: names, or {name: weight}")
    weights: list[float] | list[list[float]] | None = Field(None, description="mixture: per expert (K) or (K, M)")
    alpha_targets: list[str] | None = Field(None, description="mixture with (K, M) weights: the M matrices")
    lora_alpha: float | None = Field(None, gt=0, description="sapt: LoRA scaling numerator (scaling = alpha / r)")
    reference_targets: str = Field("mlp", description="policy_params: the target set the reference run adapted")
    append: bool = Field(False, description="peft: add the adapter as a new task of the sapt expert `name`")


def upload_metadata(m: ExpertUpload) -> UploadMetadata:
    """The validated request model as the store's plain metadata (``kind`` None where it was not sent)."""
    values = {f.name: getattr(m, f.name) for f in fields(UploadMetadata)}
    return UploadMetadata(**{**values, "kind": m.kind if "kind" in m.model_fields_set else None})


def _invalid(errors: list, prefix: tuple) -> APIError:
    return validation_error([{**e, "loc": ("body", *prefix, *e.get("loc", ()))} for e in errors])


async def read_upload(request: Request, max_bytes: int) -> Upload:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_multipart(request, max_bytes)
    if ctype not in ("application/json", ""):
        raise APIError(415, f"Content-Type {ctype!r} is not supported: send application/json or multipart/form-data.",
                       code="unsupported_media_type")
    try:
        meta = ExpertUpload.model_validate_json(await request.body())
    except ValidationError as e:
        raise _invalid(e.errors(), ()) from e
    return Upload(upload_metadata(meta))


async def _read_multipart(request: Request, max_bytes: int) -> Upload:
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=8)
    except Exception as e:  # malformed multipart, too many parts
        raise invalid_request(f"Malformed multipart body: {e}", code="invalid_multipart") from e
    try:
        files: dict[str, list[bytes]] = {}
        total, meta = 0, None
        for key, value in form.multi_items():
            if key == "metadata" and isinstance(value, str):
                meta = value
            elif key in FILE_FIELDS and isinstance(value, UploadFile):
                data = await value.read()
                total += len(data)
                if total > max_bytes:
                    err = too_large(total, max_bytes)
                    raise APIError(err.status, err.message, code=err.code, param=key)
                files.setdefault(key, []).append(data)
            else:
                raise invalid_request(f"Unexpected multipart field {key!r}: send 'metadata' and files named "
                                      f"{', '.join(FILE_FIELDS)}.", param=key)
    finally:
        await form.close()
    if meta is None:
        raise invalid_request("Missing 'metadata': a JSON object with at least the expert's name.",
                              param="metadata", code="missing_metadata")
    try:
        parsed = ExpertUpload.model_validate_json(meta)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            raise invalid_request(f"'metadata' is not valid JSON: {detail}", param="metadata",
                                  code="invalid_metadata") from e
        raise _invalid(e.errors(), ("metadata",)) from e
    if parsed.z is not None:
        raise invalid_request("'z' goes in a JSON body; in multipart, send the tensors as 'file'.", param="metadata.z")
    return Upload(upload_metadata(parsed), files, multipart=True)
