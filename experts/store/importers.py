"""Experts from other tools' files, as drafts for the store (REFERENCE.md §1, §2).

- Transformer² reference code: ``policy_params.pt`` ({``learnable_params_module_list.{i}``: z}, i in
  state-dict order of the adapted matrices: layer 0 gate, up, down; layer 1 ...) and
  ``learnable_params.pt`` ({HF parameter name ``model.layers.0.mlp.gate_proj.weight``: z}). Raw
  pre-sigmoid z, so parametrization ``sakana``.
- A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``): one PET block, i.e. a
  one-task SAPT bundle, or appended as a new task to an existing bundle (its key then needs SAPT
  training before routing means anything).
- SAPT reference checkpoints, one ``saved_weights`` folder per task in task order: each holds that
  task's ``lora_weights_A.pt`` / ``lora_weights_B.pt`` ({``model.layers.{j}.self_attn.lora_q.lora_A``:
  (r, in)}, ``...lora_B``: (out, r)); the last folder's ``trans_input.pt`` (state dict of
  Sequential(Linear(d,h), Linear(h,d), SiLU, LayerNorm(d))) and ``prompts_keys_till_now.pt`` ((T, d),
  newest task first) give the query projection and keys. The LoRA alpha is not in the files (a
  training flag; the reference default is 32).
The ``.pt`` files are pickles: they are opened only here, only with ``torch.load(weights_only=True)``.
Every importer takes bytes, so the CLI (files) and the API (uploads) share them.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

import torch

from adapters.sapt import SAPTBundle
from adapters.targets import TARGET_SETS
from experts.store.base_model import BaseModelInfo
from experts.store.errors import ExpertError, bad_metadata, bad_tensors
from experts.store.sapt_tensors import bundle_from_tensors, bundle_tensors
from experts.store.tensor_files import load_reference_checkpoint, read_safetensors, tensor_dict
from experts.store.validation import ExpertDraft

FORMATS = ("policy_params", "learnable_params", "peft", "sapt_reference")
SAPT_REFERENCE_ALPHA = 32.0
_POLICY_KEY = re.compile(r"learnable_params_module_list\.(\d+)")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight")
_SAPT_KEY = re.compile(r"(.+)\.lora_([a-z0-9]+)\.lora_([AB])")


def _need_base(base: BaseModelInfo | None, what: str) -> BaseModelInfo:
    if base is None:
        raise ExpertError(f"importing {what} needs the served model (its target matrices)", code="model_required")
    return base


def reference_targets(base: BaseModelInfo, spec: str | Sequence[str] = "mlp") -> list[str]:
    """The model's adapted matrices that a reference run with target set ``spec`` adapted, in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns = [p for item in items for p in TARGET_SETS.get(item, (item,))]
    return [t.name for t in base.targets if any(t.name == p or t.name.endswith("." + p) for p in patterns)]


def import_policy_params(data: bytes, name: str, base: BaseModelInfo | None, targets: str = "mlp") -> ExpertDraft:
    base = _need_base(base, "policy_params.pt")
    params = tensor_dict(load_reference_checkpoint(data, "policy_params.pt"), "policy_params.pt")
    index = {}
    for key, z in params.items():
        m = _POLICY_KEY.fullmatch(key)
        if m is None:
            raise bad_tensors(f"policy_params.pt: unexpected key {key!r} (expected learnable_params_module_list.N)",
                              code="unknown_target")
        index[int(m.group(1))] = z
    names = reference_targets(base, targets)
    if sorted(index) != list(range(len(index))) or len(index) != len(names):
        raise bad_tensors(f"policy_params.pt has {len(index)} vectors (indices {min(index, default=0)}.."
                          f"{max(index, default=-1)}); {base.name} has {len(names)} adapted '{targets}' matrices "
                          "to map them onto, in order",
                          code="missing_target" if len(index) < len(names) else "unknown_target")
    z = {names[i]: index[i] for i in range(len(names))}
    return ExpertDraft(name=name, kind="svf", tensors=z, parametrization="sakana", targets=tuple(names),
                       source="policy_params")


def import_learnable_params(data: bytes, name: str) -> ExpertDraft:
    params = tensor_dict(load_reference_checkpoint(data, "learnable_params.pt"), "learnable_params.pt")
    z = {}
    for key, v in params.items():
        if not key.endswith(".weight"):
            raise bad_tensors(f"learnable_params.pt: key {key!r} is not a weight parameter name", code="unknown_target")
        z[key.removesuffix(".weight")] = v
    return ExpertDraft(name=name, kind="svf", tensors=z, parametrization="sakana", targets=tuple(z),
                       source="learnable_params")


LoraBlocks = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))


def _peft_blocks(config_bytes: bytes, weights: bytes) -> tuple[int, float, LoraBlocks]:
    """(r, effective scaling, {module: (A (r, in), B (out, r))}) of a PEFT LoRA adapter."""
    try:
        cfg = json.loads(config_bytes)
    except ValueError as e:
        raise bad_metadata(f"adapter_config.json is not JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise bad_metadata("adapter_config.json is not a LoRA adapter (peft_type must be LORA)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise bad_metadata("adapter_config.json needs positive 'r' and 'lora_alpha'")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise bad_metadata(f"adapter_config.json uses {unsupported}, which this server does not apply")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_safetensors(weights, "adapter_model.safetensors").items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise bad_tensors(f"adapter_model.safetensors: {key!r} is not a LoRA A/B weight", code="unknown_tensor")
        blocks.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for module, ab in blocks.items():
        if set(ab) != {"A", "B"}:
            raise bad_tensors(f"{module}: needs both lora_A and lora_B", code="missing_tensor")
        if ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise bad_tensors(f"{module}: lora_A {tuple(ab['A'].shape)} / lora_B {tuple(ab['B'].shape)} do not have "
                              f"rank r = {r}", code="shape_mismatch")
        out[module] = (ab["A"], ab["B"])
    if not out:
        raise bad_tensors("adapter_model.safetensors holds no LoRA weights", code="missing_tensor")
    return r, scaling, out


def import_peft(config_bytes: bytes, weights: bytes, name: str, base: BaseModelInfo | None,
                append_to: SAPTBundle | None = None) -> ExpertDraft:
    """A PEFT LoRA as a one-task SAPT bundle, or as a new task of ``append_to``."""
    r, scaling, blocks = _peft_blocks(config_bytes, weights)
    if append_to is None:
        base = _need_base(base, "a PEFT adapter")
        shapes = {}
        for module in base.order(blocks):
            A, B = blocks[module]
            shapes[module] = (B.shape[0], A.shape[1])
        with torch.random.fork_rng():  # the lone task's key and query projection do not matter; be repeatable
            torch.manual_seed(0)
            bundle = SAPTBundle(shapes, d_model=base.d_model, num_tasks=0, rank=r, alpha=scaling * r)
            bundle.add_task()
    else:
        if append_to.rank != r:
            raise bad_tensors(f"the PEFT adapter has rank {r}; bundle tasks have rank {append_to.rank}",
                              code="shape_mismatch")
        extra = [m for m in blocks if m not in append_to.target_names]
        if extra:
            raise bad_tensors(f"the bundle has no LoRA block for {extra[:3]}", code="unknown_target")
        bundle = bundle_from_tensors(bundle_tensors(append_to), append_to.alpha, "import")
        bundle.add_task()
    factor = scaling / bundle.scaling  # fold the adapter's own scaling into B
    task = bundle.tasks[-1]
    with torch.no_grad():
        for j, module in enumerate(bundle.target_names):
            if module in blocks:
                A, B = blocks[module]
                if A.shape != task.A[j].shape or B.shape != task.B[j].shape:
                    raise bad_tensors(f"{module}: LoRA shapes {tuple(A.shape)}/{tuple(B.shape)} do not fit the "
                                      f"bundle's {tuple(task.A[j].shape)}/{tuple(task.B[j].shape)}",
                                      code="shape_mismatch")
                task.A[j].copy_(A)
                task.B[j].copy_(B.to(torch.float32) * factor)
            else:
                task.B[j].zero_()  # no block for this matrix in the adapter: a no-op
    return ExpertDraft(name=name, kind="sapt", tensors=bundle_tensors(bundle), lora_alpha=bundle.alpha, source="peft")


def import_sapt_reference(tasks: Sequence[tuple[bytes, bytes]], trans_input: bytes, keys: bytes, name: str,
                          lora_alpha: float = SAPT_REFERENCE_ALPHA) -> ExpertDraft:
    """``tasks``: (lora_weights_A.pt, lora_weights_B.pt) bytes per task, oldest first."""
    if not tasks:
        raise bad_tensors("no task checkpoints given", code="missing_tensor")
    qp = tensor_dict(load_reference_checkpoint(trans_input, "trans_input.pt"), "trans_input.pt")
    expected = {"0.weight", "1.weight", "3.weight", "3.bias"}
    if set(qp) != expected:
        raise bad_tensors(f"trans_input.pt must hold {sorted(expected)}; got {sorted(qp)}", code="missing_tensor")
    key_t = load_reference_checkpoint(keys, "prompts_keys_till_now.pt")
    if not isinstance(key_t, torch.Tensor) or key_t.dim() != 2 or key_t.shape[0] != len(tasks):
        shape = tuple(key_t.shape) if isinstance(key_t, torch.Tensor) else type(key_t).__name__
        raise bad_tensors(f"prompts_keys_till_now.pt must be a ({len(tasks)}, d) tensor, one key per task; got {shape}",
                          code="shape_mismatch")
    T = len(tasks)
    out = {"query.down": qp["0.weight"], "query.up": qp["1.weight"],
           "query.norm.weight": qp["3.weight"], "query.norm.bias": qp["3.bias"]}
    for i, (a_bytes, b_bytes) in enumerate(tasks):
        out[f"task.{i}.key"] = key_t[T - 1 - i]  # the reference stores the newest key first
        for label, data in (("A", a_bytes), ("B", b_bytes)):
            what = f"task {i} lora_weights_{label}.pt"
            for key, t in tensor_dict(load_reference_checkpoint(data, what), what).items():
                m = _SAPT_KEY.fullmatch(key)
                if m is None or m.group(3) != label:
                    raise bad_tensors(f"{what}: unexpected key {key!r}", code="unknown_tensor")
                out[f"task.{i}.lora_{label}.{m.group(1)}.{m.group(2)}_proj"] = t
    return ExpertDraft(name=name, kind="sapt", tensors=out, lora_alpha=float(lora_alpha), source="sapt_reference")
