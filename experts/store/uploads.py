"""From the files of a format and the metadata sent with them to an ``ExpertDraft``, for any channel
(``POST /v1/experts``, ``t2serve experts import``).

``UploadMetadata`` is what the sender said about the expert, already checked for types (the HTTP edge
validates its request model first); ``Upload`` adds the files by field name: ``file`` (safetensors, or the
``.pt`` of ``policy_params`` / ``learnable_params``, or PEFT's ``adapter_model.safetensors``), ``config``
(PEFT's ``adapter_config.json``), and for ``sapt_reference`` one ``lora_weights_A`` and ``lora_weights_B``
per task (task order) plus ``trans_input`` and ``prompts_keys_till_now``. ``format`` says which:
``safetensors`` (this server's own layout) or an importer's format. Bad input raises ``ExpertError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from experts.store.errors import ExpertError, bad_metadata
from experts.store.expert_store import ExpertStore
from experts.store.importers import (
    SAPT_REFERENCE_ALPHA,
    import_learnable_params,
    import_peft,
    import_policy_params,
    import_sapt_reference,
)
from experts.store.tensor_files import check_unpacked_size, read_safetensors
from experts.store.validation import ExpertDraft

# The kind each importer's format makes (safetensors holds whatever ``kind`` says).
FORMAT_KINDS = {"policy_params": "svf", "learnable_params": "svf", "peft": "sapt", "sapt_reference": "sapt"}


@dataclass(frozen=True)
class UploadMetadata:
    """What the sender says about the expert (the fields of ``POST /v1/experts``'s ``metadata``)."""

    name: str
    kind: str | None = None  # svf | mixture | sapt; None: not given (svf, or what the format makes)
    category: str | None = None
    description: str = ""
    format: str = "safetensors"  # or policy_params | learnable_params | peft | sapt_reference
    parametrization: str = "sakana"
    targets: list[str] | None = None  # svf: the matrices z must cover exactly
    base_fingerprint: str | None = None
    z: dict[str, list[float]] | None = None  # svf without files: {module name: z values}
    experts: list[str] | dict[str, float] | None = None  # mixture: names, or {name: weight}
    weights: list[float] | list[list[float]] | None = None  # mixture: per expert (K) or (K, M)
    alpha_targets: list[str] | None = None  # mixture with (K, M) weights: the M matrices
    lora_alpha: float | None = None  # sapt: LoRA scaling numerator (scaling = alpha / r)
    reference_targets: str = "mlp"  # policy_params: the target set the reference run adapted
    append: bool = False  # peft: add the adapter as a new task of the sapt expert ``name``


@dataclass
class Upload:
    meta: UploadMetadata
    files: dict[str, list[bytes]] = field(default_factory=dict)
    multipart: bool = False  # the files came as separate parts: errors about tensors name the file


def _one(upload: Upload, key: str, fmt: str) -> bytes:
    got = upload.files.get(key, [])
    if len(got) != 1:
        raise ExpertError(f"format {fmt!r} needs exactly one file part {key!r} (got {len(got)})",
                          code="missing_file", param=key)
    return got[0]


def _mixture_alpha(m: UploadMetadata) -> tuple[tuple[str, ...], torch.Tensor]:
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
    kind = m.kind or "svf"
    if fmt in FORMAT_KINDS and m.kind is not None and m.kind != FORMAT_KINDS[fmt]:
        raise ExpertError(f"format {fmt!r} makes a {FORMAT_KINDS[fmt]} expert, not {m.kind}",
                          code="invalid_metadata", param="kind")
    if m.lora_alpha is not None and not m.lora_alpha > 0:  # the HTTP model refuses it first; the CLI does not
        raise bad_metadata("lora_alpha must be > 0 (the LoRA scaling is lora_alpha / r)", param="lora_alpha")
    for form_field, blobs in upload.files.items():  # archives are refused by their unpacked size, before loading
        for data in blobs:
            check_unpacked_size(data, form_field, store.max_bytes)
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
    elif kind == "mixture":
        names, alpha = _mixture_alpha(m)
        draft = ExpertDraft(m.name, "mixture", {"alpha": alpha})
        extra = {"experts": names, "alpha_targets": tuple(m.alpha_targets) if m.alpha_targets is not None else None}
    elif upload.files:
        draft = ExpertDraft(m.name, kind, read_safetensors(_one(upload, "file", fmt)), lora_alpha=m.lora_alpha,
                            parametrization=m.parametrization)
    elif m.z is not None and kind == "svf":
        draft = ExpertDraft(m.name, "svf", {k: torch.tensor(v, dtype=torch.float32) for k, v in m.z.items()},
                            parametrization=m.parametrization)
    else:
        raise ExpertError(f"no tensors: send 'z' in a JSON body or the {kind} tensors as a multipart 'file'",
                          code="missing_file", param="file")
    targets = tuple(m.targets) if m.targets is not None else draft.targets
    return replace(draft, category=m.category, description=m.description, base_fingerprint=m.base_fingerprint,
                   targets=targets, **extra)
