"""Stored experts in other tools' formats (the inverse of ``importers``, where a format can hold them).

- svf -> ``policy_params.pt`` (z of the expert's matrices in model order as
  ``learnable_params_module_list.{i}``) or ``learnable_params.pt`` ({``<module>.weight``: z}).
- sapt -> the SAPT reference layout (one ``{i}-task{i}/saved_weights`` folder per task; the last one also
  holds ``trans_input.pt`` and ``prompts_keys_till_now.pt``, newest key first), or one task as a PEFT
  LoRA folder. Soft prompts have no place in either format.
Each exporter returns {relative path: bytes}; writing them is the caller's business.
"""
from __future__ import annotations

import io
import json
import re

import torch

from experts.store.errors import ExpertError
from experts.store.records import ExpertRecord
from experts.store.sapt_tensors import bundle_from_tensors

FORMATS = ("safetensors", "policy_params", "learnable_params", "sapt_reference", "peft")
_PROJ = re.compile(r"(.+)\.([a-z0-9]+)_proj")


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _need(record: ExpertRecord, kind: str, fmt: str) -> None:
    if record.kind != kind:
        raise ExpertError(f"{fmt} holds {kind} experts; {record.name!r} is a {record.kind} expert",
                          code="unsupported_format", param="format")


def export(record: ExpertRecord, tensors: dict[str, torch.Tensor], fmt: str, task: int | None = None,
           raw: bytes | None = None) -> dict[str, bytes]:
    if fmt == "safetensors":
        return {f"{record.name}.safetensors": raw, f"{record.name}.json": record.to_json().encode()}
    if fmt in ("policy_params", "learnable_params"):
        _need(record, "svf", fmt)
        z = [tensors[t].clone() for t in record.targets]
        if fmt == "policy_params":
            return {"policy_params.pt": _pt({f"learnable_params_module_list.{i}": v for i, v in enumerate(z)})}
        return {"learnable_params.pt": _pt({f"{t}.weight": v for t, v in zip(record.targets, z)})}
    if fmt in ("sapt_reference", "peft"):
        _need(record, "sapt", fmt)
        bundle = bundle_from_tensors(tensors, record.spec["lora_alpha"], record.name)
        if bundle.prompt_len:
            raise ExpertError(f"{fmt} cannot hold soft prompts", code="unsupported_format", param="format")
        return _sapt_reference(bundle) if fmt == "sapt_reference" else _peft(bundle, record, task)
    raise ExpertError(f"unknown export format {fmt!r}; one of {FORMATS}", code="unsupported_format", param="format")


def _reference_name(target: str) -> str:
    m = _PROJ.fullmatch(target)
    if m is None:
        raise ExpertError(f"{target} has no name in the SAPT reference layout", code="unsupported_format")
    return f"{m.group(1)}.lora_{m.group(2)}"


def _sapt_reference(bundle) -> dict[str, bytes]:
    out = {}
    T = bundle.num_tasks
    keys = torch.stack([t.key.detach().clone() for t in bundle.tasks])
    for i, task in enumerate(bundle.tasks):
        folder = f"{i + 1}-task{i}/saved_weights"
        A = {f"{_reference_name(n)}.lora_A": task.A[j].detach().clone() for j, n in enumerate(bundle.target_names)}
        B = {f"{_reference_name(n)}.lora_B": task.B[j].detach().clone() for j, n in enumerate(bundle.target_names)}
        out[f"{folder}/lora_weights_A.pt"] = _pt(A)
        out[f"{folder}/lora_weights_B.pt"] = _pt(B)
        out[f"{folder}/prompts_keys_till_now.pt"] = _pt(keys[: i + 1].flip(0).contiguous())
    qp = bundle.query_proj
    last = f"{T}-task{T - 1}/saved_weights"
    out[f"{last}/trans_input.pt"] = _pt({"0.weight": qp.down.weight.detach().clone(),
                                        "1.weight": qp.up.weight.detach().clone(),
                                        "3.weight": qp.norm.weight.detach().clone(),
                                        "3.bias": qp.norm.bias.detach().clone()})
    return out


def _peft(bundle, record: ExpertRecord, task: int | None) -> dict[str, bytes]:
    from safetensors.torch import save

    if task is None and bundle.num_tasks != 1:
        raise ExpertError(f"{record.name!r} has {bundle.num_tasks} tasks; choose one (task) for a PEFT adapter",
                          code="unsupported_format", param="task")
    i = 0 if task is None else task
    if not 0 <= i < bundle.num_tasks:
        raise ExpertError(f"task {i} does not exist (0..{bundle.num_tasks - 1})", code="invalid_value", param="task")
    t = bundle.tasks[i]
    weights = {}
    for j, n in enumerate(bundle.target_names):
        weights[f"base_model.model.{n}.lora_A.weight"] = t.A[j].detach().contiguous()
        weights[f"base_model.model.{n}.lora_B.weight"] = t.B[j].detach().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": bundle.rank, "lora_alpha": bundle.alpha,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in bundle.target_names}), "bias": "none",
              "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False,
              "base_model_name_or_path": record.base_model}
    return {"adapter_config.json": json.dumps(config, indent=2).encode(), "adapter_model.safetensors": save(weights)}
