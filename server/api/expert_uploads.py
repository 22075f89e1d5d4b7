"""The body of ``POST /v1/experts``, turned into an ``ExpertDraft`` for the store.

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

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from experts.errors import ExpertError
from experts.importers import (SAPT_REFERENCE_ALPHA, import_learnable_params, import_peft, import_policy_params,
                               import_sapt_reference)
from experts.store import ExpertStore, too_large
from experts.tensor_files import read_safetensors
from experts.validation import ExpertDraft
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


@dataclass
class Upload:
    meta: ExpertUpload
    files: dict[str, list[bytes]] = field(default_factory=dict)
    multipart: bool = False


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
        return Upload(ExpertUpload.model_validate_json(await request.body()))
    except ValidationError as e:
        raise _invalid(e.errors(), ()) from e


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
    return Upload(parsed, files, multipart=True)


def _one(upload: Upload, key: str, fmt: str) -> bytes:
    got = upload.files.get(key, [])
    if len(got) != 1:
        raise ExpertError(f"format {fmt!r} needs exactly one file part {key!r} (got {len(got)})",
                          code="missing_file", param=key)
    return got[0]


def _mixture_alpha(m: ExpertUpload) -> tuple[tuple[str, ...], torch.Tensor]:
    if isinstance(m.experts, dict):
        if m.weights is not None:
            raise ExpertError("give weights either inside 'experts' ({name: weight}) or as 'weights', not both",
                              code="invalid_mixture", param="weights")
        return tuple(m.experts), torch.tensor(list(m.experts.values()), dtype=torch.float32)
    if not m.experts:
        raise ExpertError("a mixture needs 'experts'", code="invalid_mixture", param="experts")
    weights = m.weights if m.weights is not None else [1.0 / len(m.experts)] * len(m.experts)
    try:
        return tuple(m.experts), torch.tensor(weights, dtype=torch.float32)
    except (ValueError, TypeError) as e:  # ragged (K, M) lists
        raise ExpertError(f"'weights' must be K numbers or K equal-length lists: {e}", code="invalid_mixture",
                          param="weights") from e


def to_draft(upload: Upload, store: ExpertStore) -> ExpertDraft:
    """The draft an upload describes (runs in a worker thread: it parses tensors)."""
    m, fmt = upload.meta, upload.meta.format
    kinds = {"policy_params": "svf", "learnable_params": "svf", "peft": "sapt", "sapt_reference": "sapt"}
    if fmt in kinds and "kind" in m.model_fields_set and m.kind != kinds[fmt]:
        raise ExpertError(f"format {fmt!r} makes a {kinds[fmt]} expert, not {m.kind}", code="invalid_metadata",
                          param="kind")
    extra = {"experts": (), "alpha_targets": None}
    if fmt == "policy_params":
        draft = import_policy_params(_one(upload, "file", fmt), m.name, store.base, m.reference_targets)
    elif fmt == "learnable_params":
        draft = import_learnable_params(_one(upload, "file", fmt), m.name)
    elif fmt == "peft":
        bundle = store.bundle(m.name) if m.append else None
        if m.append and bundle is None:
            raise ExpertError(f"append: there is no ready sapt expert {m.name!r} to add a task to",
                              code="expert_not_found", status=404, param="name")
        draft = import_peft(_one(upload, "config", fmt), _one(upload, "file", fmt), m.name, store.base, bundle)
    elif fmt == "sapt_reference":
        A, B = upload.files.get("lora_weights_A", []), upload.files.get("lora_weights_B", [])
        if not A or len(A) != len(B):
            raise ExpertError(f"sapt_reference needs one lora_weights_A and one lora_weights_B per task "
                              f"(got {len(A)} and {len(B)})", code="missing_file", param="lora_weights_A")
        draft = import_sapt_reference(list(zip(A, B)), _one(upload, "trans_input", fmt),
                                      _one(upload, "prompts_keys_till_now", fmt), m.name,
                                      m.lora_alpha or SAPT_REFERENCE_ALPHA)
    elif m.kind == "mixture":
        names, alpha = _mixture_alpha(m)
        draft = ExpertDraft(m.name, "mixture", {"alpha": alpha})
        extra = {"experts": names, "alpha_targets": tuple(m.alpha_targets) if m.alpha_targets is not None else None}
    elif upload.files:
        draft = ExpertDraft(m.name, m.kind, read_safetensors(_one(upload, "file", fmt)), lora_alpha=m.lora_alpha,
                            parametrization=m.parametrization)
    elif m.z is not None and m.kind == "svf":
        draft = ExpertDraft(m.name, "svf", {k: torch.tensor(v, dtype=torch.float32) for k, v in m.z.items()},
                            parametrization=m.parametrization)
    else:
        raise ExpertError(f"no tensors: send 'z' in a JSON body or the {m.kind} tensors as a multipart 'file'",
                          code="missing_file", param="file")
    targets = tuple(m.targets) if m.targets is not None else draft.targets
    return replace(draft, category=m.category, description=m.description, base_fingerprint=m.base_fingerprint,
                   targets=targets, **extra)
