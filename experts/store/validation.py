"""From a submitted expert (``ExpertDraft``: an upload, an import, a training run) to a validated one.

Checks, each raising ExpertError with a code that names the problem: name and metadata, dtype and
NaN/Inf of every tensor, the base-model fingerprint, and fit to the served model: every SVF z names an
adapted matrix and has its k = min(out, in) values; every SAPT LoRA block fits its matrix (r, in) /
(out, r) and the bundle's keys the hidden size. ``base=None`` (no model at hand, e.g. offline tools)
skips only the model checks. Mixtures are checked here for shape; their components are looked up
when the store commits them (``mix_components``), under its lock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adapters.adaptation import SVFExpert, SVFMixture
from adapters.sapt import SAPTBundle
from adapters.svf import PARAMETRIZATIONS
from experts.store.base_model import BaseModelInfo
from experts.store.errors import ExpertError, bad_metadata, bad_tensors
from experts.store.records import KINDS, MAX_DESCRIPTION, SOURCE_RE, ExpertRecord, check_category, check_name
from experts.store.sapt_tensors import bundle_from_tensors, bundle_spec, bundle_tensors
from experts.store.tensor_files import check_floats

MAX_MIXTURE_EXPERTS = 16
MAX_ALPHA = 10.0  # the same bound as requests' explicit mixture weights
# Value bounds that keep adapted weights finite and meaningful in any serving dtype (float16 included):
# - sakana z: any finite z gives finite weights (the rescale keeps Σ s = Σσ, computed stably); |z| <= 1e4
#   only refuses values no training produces (sigmoid is flat beyond ±20).
# - direct z: s = σ⊙z, so W' grows with z; |z| <= 64 keeps every singular value within 64x of the base
#   one, and a mixture (at most 16 experts x |alpha| <= 10) within 1e4x: finite in float16 for σ < 6.
# - SAPT tensors (LoRA A, B, keys, query projection): |x| <= 1e3.
MAX_Z = {"sakana": 1e4, "direct": 64.0}
MAX_SAPT_VALUE = 1e3


@dataclass
class ExpertDraft:
    """An expert as submitted, before validation."""

    name: str
    kind: str  # svf | mixture | sapt
    tensors: dict[str, torch.Tensor]  # svf: z per target; mixture: {"alpha"}; sapt: sapt_tensors layout
    category: str | None = None
    description: str = ""
    parametrization: str = "sakana"  # svf
    targets: tuple[str, ...] | None = None  # svf: if given, exactly the matrices the z vectors must cover
    base_fingerprint: str | None = None  # of the model it was made for; None: trust the shapes
    experts: tuple[str, ...] = ()  # mixture: component names; alpha row k belongs to experts[k]
    alpha_targets: tuple[str, ...] | None = None  # mixture with alpha (K, M): the M matrices, in column order
    lora_alpha: float | None = None  # sapt: LoRA scaling is lora_alpha / r
    source: str = "upload"


@dataclass
class PreparedExpert:
    """A validated draft: canonical float32 tensors (what gets stored) and the object served."""

    draft: ExpertDraft
    tensors: dict[str, torch.Tensor]
    targets: tuple[str, ...]
    spec: dict = field(default_factory=dict)
    payload: SVFExpert | SAPTBundle | None = None  # None for mixtures until their components are known

    def record(self, *, version: int, sha256: str, size: int, created: int, base: BaseModelInfo | None,
               parametrization: str | None = None, targets: tuple[str, ...] | None = None) -> ExpertRecord:
        d = self.draft
        fingerprint = d.base_fingerprint or (base.fingerprint if base else None)
        return ExpertRecord(
            name=d.name, kind=d.kind, version=version, created=created, sha256=sha256, size=size,
            category=d.category, description=d.description,
            parametrization=parametrization or (d.parametrization if d.kind == "svf" else None),
            targets=targets if targets is not None else self.targets, base_fingerprint=fingerprint,
            base_model=base.name if base else None, spec=self.spec, source=d.source)


def draft_from_record(record: ExpertRecord, tensors: dict[str, torch.Tensor]) -> ExpertDraft:
    """The draft a stored version was made from (to validate it again at start)."""
    spec = record.spec
    alpha_targets = spec.get("alpha_targets")
    return ExpertDraft(
        name=record.name, kind=record.kind, tensors=tensors, category=record.category,
        description=record.description, parametrization=record.parametrization or "sakana",
        targets=tuple(record.targets) if record.kind == "svf" else None,
        base_fingerprint=record.base_fingerprint, experts=tuple(spec.get("experts", ())),
        alpha_targets=tuple(alpha_targets) if alpha_targets is not None else None,
        lora_alpha=spec.get("lora_alpha"), source=record.source)


def prepare(draft: ExpertDraft, base: BaseModelInfo | None) -> PreparedExpert:
    check_name(draft.name)
    check_category(draft.category)
    if draft.kind not in KINDS:
        raise bad_metadata(f"kind {draft.kind!r} is not one of {', '.join(KINDS)}", param="kind")
    if not isinstance(draft.description, str) or len(draft.description) > MAX_DESCRIPTION:
        raise bad_metadata(f"description must be at most {MAX_DESCRIPTION} characters", param="description")
    if not SOURCE_RE.fullmatch(draft.source):
        raise bad_metadata(f"source {draft.source!r} is not a source tag like 'upload' or 'few_shot:<id>'",
                           param="source")
    if base is not None and base.fingerprint and draft.base_fingerprint and draft.base_fingerprint != base.fingerprint:
        raise ExpertError(
            f"Expert {draft.name!r} was made for another base model (fingerprint {draft.base_fingerprint[:12]}…); "
            f"this server serves {base.name} (fingerprint {base.fingerprint[:12]}…).",
            code="base_model_mismatch", param="base_fingerprint")
    if not draft.tensors and draft.kind != "mixture":
        raise bad_tensors(f"expert {draft.name!r} has no tensors", code="missing_target")
    tensors = check_floats(draft.tensors)
    if draft.kind == "svf":
        return _prepare_svf(draft, tensors, base)
    if draft.kind == "mixture":
        return _prepare_mixture(draft, tensors)
    return _prepare_sapt(draft, tensors, base)


def _prepare_svf(draft: ExpertDraft, tensors: dict, base: BaseModelInfo | None) -> PreparedExpert:
    if draft.parametrization not in PARAMETRIZATIONS:
        raise bad_metadata(f"parametrization {draft.parametrization!r} is not one of {PARAMETRIZATIONS}",
                           param="parametrization")
    if draft.targets is not None:
        declared = set(draft.targets)
        missing = [t for t in draft.targets if t not in tensors]
        if missing:
            raise bad_tensors(f"no z vector for declared target(s) {_few(missing)}", code="missing_target")
        extra = [t for t in tensors if t not in declared]
        if extra:
            raise bad_tensors(f"z vector(s) for undeclared target(s) {_few(extra)}", code="unknown_target")
    bound = MAX_Z[draft.parametrization]
    for name, z in tensors.items():
        if z.dim() != 1:
            raise bad_tensors(f"z of {name} must be a vector, got shape {tuple(z.shape)}", code="shape_mismatch")
        if z.numel() and float(z.abs().max()) > bound:
            raise bad_tensors(f"z of {name} has values beyond ±{bound:g}, the bound for {draft.parametrization} "
                              "experts (it keeps adapted weights finite)", code="out_of_range")
    if base is not None:
        if not base.targets:
            raise bad_tensors(f"{base.name} is served without adapted matrices (T2_ADAPT_TARGETS=none): "
                              "SVF experts cannot be applied", code="unknown_target")
        unknown = [n for n in tensors if base.target(n) is None]
        if unknown:
            raise bad_tensors(f"{_few(unknown)} {'is' if len(unknown) == 1 else 'are'} not adapted matrices of "
                              f"{base.name} (adapted here: {_few([t.name for t in base.targets], 2)}; "
                              "see T2_ADAPT_TARGETS)", code="unknown_target")
        for name, z in tensors.items():
            k = base.target(name).rank
            if z.shape[0] != k:
                raise bad_tensors(f"z of {name} has {z.shape[0]} values; that matrix has k = {k} singular values",
                                  code="shape_mismatch")
        order = base.order(tensors)
    else:
        order = list(tensors)
    z = {n: tensors[n] for n in order}
    return PreparedExpert(draft, z, tuple(order), {}, SVFExpert(draft.name, z, draft.parametrization))


def _prepare_mixture(draft: ExpertDraft, tensors: dict) -> PreparedExpert:
    names = list(draft.experts)
    if not 1 <= len(names) <= MAX_MIXTURE_EXPERTS:
        raise bad_metadata(f"a mixture names 1 to {MAX_MIXTURE_EXPERTS} experts, got {len(names)}", param="experts")
    for n in names:
        check_name(n, param="experts")
    if len(set(names)) != len(names) or draft.name in names:
        raise bad_metadata("a mixture names each expert once, and not itself", param="experts")
    if set(tensors) != {"alpha"}:
        raise bad_tensors(f"a mixture has exactly one tensor, 'alpha'; got {_few(sorted(tensors))}",
                          code="unknown_tensor")
    alpha, K = tensors["alpha"], len(names)
    cols = draft.alpha_targets
    if cols is None and alpha.shape != (K,):
        raise bad_tensors(f"alpha must have one weight per expert, shape ({K},); got {tuple(alpha.shape)}",
                          code="shape_mismatch")
    if cols is not None and (alpha.dim() != 2 or alpha.shape != (K, len(cols)) or len(set(cols)) != len(cols)):
        raise bad_tensors(f"alpha per expert x matrix must be ({K}, {len(cols)}) for {len(cols)} distinct "
                          f"alpha_targets; got {tuple(alpha.shape)}", code="shape_mismatch")
    if float(alpha.abs().max()) > MAX_ALPHA:
        raise bad_tensors(f"mixture weights must lie in [-{MAX_ALPHA:g}, {MAX_ALPHA:g}]", code="invalid_value")
    spec = {"experts": names, "alpha_targets": list(cols) if cols is not None else None,
            "weights": alpha.tolist()}
    return PreparedExpert(draft, {"alpha": alpha}, (), spec, None)


def mix_components(prepared: PreparedExpert, components: list[SVFExpert]) -> SVFExpert:
    """The mixture as one SVF expert: z'_t = sum_k alpha_k(,t) z_k,t (exactly what a request-time
    mixture computes, since the composition is applied after mixing z)."""
    d = prepared.draft
    try:
        mix = SVFMixture(tuple(components), prepared.tensors["alpha"], d.alpha_targets)
        z = {t: mix.z_for(t).detach().to(torch.float32).contiguous() for t in mix.target_names}
        return SVFExpert(d.name, z, mix.parametrization)
    except ValueError as e:
        raise ExpertError(f"mixture {d.name!r}: {e}", code="invalid_mixture", param="experts") from e


def _prepare_sapt(draft: ExpertDraft, tensors: dict, base: BaseModelInfo | None) -> PreparedExpert:
    a = draft.lora_alpha
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise bad_metadata("a sapt expert needs lora_alpha > 0 (the LoRA scaling is lora_alpha / r)",
                           param="lora_alpha")
    for name, x in tensors.items():
        if x.numel() and float(x.abs().max()) > MAX_SAPT_VALUE:
            raise bad_tensors(f"SAPT tensor {name} has values beyond ±{MAX_SAPT_VALUE:g} (the bound that keeps "
                              "adapted weights finite)", code="out_of_range")
    bundle = bundle_from_tensors(tensors, float(a), bundle_id=draft.name,
                                 target_order=[t.name for t in base.targets] if base else None)
    if base is not None:
        for name, (out_f, in_f) in zip(bundle.target_names, bundle.shapes):
            t = base.target(name)
            if t is None:
                raise bad_tensors(f"{name} is not an adapted matrix of {base.name} (see T2_ADAPT_TARGETS: SAPT "
                                  "blocks need their matrices adapted, e.g. --adapt-targets all)",
                                  code="unknown_target")
            if (t.out_features, t.in_features) != (out_f, in_f):
                raise bad_tensors(f"LoRA block of {name} is for a {out_f}x{in_f} matrix; the model's is "
                                  f"{t.out_features}x{t.in_features}", code="shape_mismatch")
        if base.d_model is not None and bundle.d_model != base.d_model:
            raise bad_tensors(f"SAPT keys have {bundle.d_model} dimensions; the model's hidden size is "
                              f"{base.d_model}", code="shape_mismatch")
    return PreparedExpert(draft, bundle_tensors(bundle), tuple(bundle.target_names), bundle_spec(bundle), bundle)


def with_version_id(prepared: PreparedExpert, sha256: str) -> PreparedExpert:
    """Give a SAPT bundle its content-derived id (adaptation cache keys must change with the weights)."""
    if isinstance(prepared.payload, SAPTBundle):
        prepared.payload.bundle_id = f"{prepared.draft.name}@{sha256[:16]}"
    return prepared


def _few(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")
