"""A SAPT bundle as named tensors (this store's file layout) and back.

Names are ours and stable, independent of the bundle's module attributes:
    query.down (h, d)   query.up (d, h)   query.norm.weight (d)   query.norm.bias (d)
    task.{i}.key (d)    task.{i}.prompt (P, d), only with soft prompts
    task.{i}.lora_A.{target} (r, in)      task.{i}.lora_B.{target} (out, r)
Everything else about the bundle (rank, hidden size, prompt length, task count) is read off the shapes;
only the LoRA ``alpha`` (scaling alpha/r) is not in the tensors and comes from the record's spec.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from adapters.sapt import SAPTBundle
from experts.store.errors import bad_tensors

_TASK_RE = re.compile(r"task\.(\d+)\.(key|prompt|lora_A|lora_B)(?:\.(.+))?")
_QUERY = ("query.down", "query.up", "query.norm.weight", "query.norm.bias")


def bundle_tensors(bundle: SAPTBundle) -> dict[str, torch.Tensor]:
    qp = bundle.query_proj
    out = {"query.down": qp.down.weight, "query.up": qp.up.weight,
           "query.norm.weight": qp.norm.weight, "query.norm.bias": qp.norm.bias}
    for i, task in enumerate(bundle.tasks):
        out[f"task.{i}.key"] = task.key
        if task.prompt is not None:
            out[f"task.{i}.prompt"] = task.prompt
        for j, name in enumerate(bundle.target_names):
            out[f"task.{i}.lora_A.{name}"] = task.A[j]
            out[f"task.{i}.lora_B.{name}"] = task.B[j]
    return {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in out.items()}


def bundle_from_tensors(tensors: Mapping[str, torch.Tensor], lora_alpha: float, bundle_id: str,
                        target_order: list[str] | None = None) -> SAPTBundle:
    """Build (and freeze) a bundle; shapes must agree with each other (checked, errors name the tensor)."""
    missing = [k for k in _QUERY if k not in tensors]
    if missing:
        raise bad_tensors(f"SAPT bundle is missing {missing}", code="missing_tensor")
    down, up = tensors["query.down"], tensors["query.up"]
    if down.dim() != 2 or up.shape != (down.shape[1], down.shape[0]):
        raise bad_tensors(f"query.down {tuple(down.shape)} and query.up {tuple(up.shape)} must be (h, d) and (d, h)",
                          code="shape_mismatch")
    hidden, d = down.shape
    tasks: dict[int, dict] = {}
    for key, t in tensors.items():
        if key in _QUERY:
            continue
        m = _TASK_RE.fullmatch(key)
        if m is None or (m.group(2) in ("lora_A", "lora_B")) != (m.group(3) is not None):
            raise bad_tensors(f"unexpected tensor {key!r} in a SAPT bundle", code="unknown_tensor")
        i, part, target = int(m.group(1)), m.group(2), m.group(3)
        slot = tasks.setdefault(i, {"lora_A": {}, "lora_B": {}})
        if target is None:
            slot[part] = t
        else:
            slot[part][target] = t
    if sorted(tasks) != list(range(len(tasks))) or not tasks:
        raise bad_tensors(f"SAPT task indices must be 0..T-1, got {sorted(tasks)}", code="missing_tensor")
    first = tasks[0]
    targets = list(first["lora_A"])
    if target_order is not None:
        targets = [n for n in target_order if n in first["lora_A"]] + [n for n in targets if n not in target_order]
    if not targets:
        raise bad_tensors("SAPT bundle has no LoRA blocks", code="missing_tensor")
    rank = first["lora_A"][targets[0]].shape[0]
    prompt_len = first["prompt"].shape[0] if "prompt" in first else 0
    shapes: dict[str, tuple[int, int]] = {}
    for i, slot in tasks.items():
        if set(slot["lora_A"]) != set(targets) or set(slot["lora_B"]) != set(targets):
            raise bad_tensors(f"task {i} must have lora_A and lora_B for exactly the targets of task 0",
                              code="missing_tensor")
        if "key" not in slot or slot["key"].shape != (d,):
            raise bad_tensors(f"task.{i}.key must have shape ({d},)", code="shape_mismatch")
        if ("prompt" in slot) != bool(prompt_len) or (prompt_len and slot["prompt"].shape != (prompt_len, d)):
            raise bad_tensors(f"task.{i}.prompt must be ({prompt_len}, {d}) in every task or in none",
                              code="shape_mismatch")
        for name in targets:
            A, B = slot["lora_A"][name], slot["lora_B"][name]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
                raise bad_tensors(f"task {i} {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be "
                                  f"(r, in) and (out, r) with r = {rank}", code="shape_mismatch")
            shape = (B.shape[0], A.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise bad_tensors(f"{name}: tasks disagree on its shape", code="shape_mismatch")
    for norm in ("query.norm.weight", "query.norm.bias"):
        if tensors[norm].shape != (d,):
            raise bad_tensors(f"{norm} must have shape ({d},)", code="shape_mismatch")
    bundle = SAPTBundle({n: shapes[n] for n in targets}, d_model=d, num_tasks=len(tasks), rank=rank,
                        alpha=lora_alpha, prompt_len=prompt_len, hidden=hidden, bundle_id=bundle_id)
    with torch.no_grad():
        qp = bundle.query_proj
        qp.down.weight.copy_(down)
        qp.up.weight.copy_(up)
        qp.norm.weight.copy_(tensors["query.norm.weight"])
        qp.norm.bias.copy_(tensors["query.norm.bias"])
        for i, task in enumerate(bundle.tasks):
            task.key.copy_(tasks[i]["key"])
            if prompt_len:
                task.prompt.copy_(tasks[i]["prompt"])
            for j, name in enumerate(targets):
                task.A[j].copy_(tasks[i]["lora_A"][name])
                task.B[j].copy_(tasks[i]["lora_B"][name])
    return bundle.requires_grad_(False).eval()  # served bundles are constants (cacheable adaptations)


def bundle_spec(bundle: SAPTBundle) -> dict:
    """What the record keeps about a bundle (for listings; the tensors are the truth)."""
    return {"num_tasks": bundle.num_tasks, "rank": bundle.rank, "lora_alpha": bundle.alpha,
            "d_model": bundle.d_model, "prompt_len": bundle.prompt_len,
            "hidden": bundle.query_proj.down.weight.shape[0],
            "shapes": {n: list(s) for n, s in zip(bundle.target_names, bundle.shapes)}}
