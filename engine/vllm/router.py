"""How one request's adaptation is served on vLLM, decided once per distinct adaptation.

- no adaptation: the base weights;
- SAPT weights: a LoRA adapter of rank T·r with the request's attention folded in (exact);
- SVF experts, ``svf_mode="swap"``: the merged weights, swapped in for the request's group (exact);
- SVF experts, ``svf_mode="lora"``: the change ΔW truncated per matrix to the smallest rank within the
  error budget, as a LoRA adapter (one rank for all matrices: the largest any of them needs). If that
  rank, plus the SAPT rank of the same adaptation, exceeds the largest LoRA rank the engine serves, the
  SVF part is served by swapping instead: the budget always holds. The report says which, per matrix.
An adaptation with both parts gets both (its SAPT adapter over its swapped weights, or one adapter
holding both changes).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.adaptation import Adaptation
from adapters.lora_export import LoraFactors, concat, sapt_lora, svf_lora, svf_truncation
from engine.vllm.adapter_cache import Adapter, AdapterCache
from engine.vllm.peft_folder import write_peft_adapter

log = logging.getLogger("t2serve.vllm")

SVF_MODES = ("swap", "lora")


@dataclass
class Plan:
    """What serving one adaptation takes."""

    weights_key: str | None = None  # key of the swapped weights (None: the base weights)
    weights: Any = None  # the SVF-only Adaptation whose merged weights are swapped in
    lora_key: str | None = None  # content key of the adapter (None: no adapter)
    svf: str | None = None  # how the SVF part is served: "swap" | "lora" | None
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # lora: singular directions kept per matrix
    report: dict = field(default_factory=dict)


BASE = Plan()


@dataclass
class Route:
    plan: Plan
    adapter: Adapter | None = None


class Router:
    def __init__(self, runtime, cache: AdapterCache, model_name: str, dtype: torch.dtype, *,
                 svf_mode: str = "swap", budget: float = 0.1, max_rank: int = 64, max_plans: int = 1024):
        if svf_mode not in SVF_MODES:
            raise ValueError(f"svf mode must be one of {SVF_MODES}, got {svf_mode!r}")
        self.runtime, self.cache, self.model_name, self.dtype = runtime, cache, model_name, dtype
        self.svf_mode, self.budget, self.max_rank = svf_mode, budget, max_rank
        self.layers = {} if runtime is None else {layer.name: layer for layer in runtime.layers}
        self.sigma = {name: layer.S for name, layer in self.layers.items()}
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()  # planned in worker threads: under _lock
        self._lock = threading.Lock()
        self.max_plans = max_plans

    # --- deciding ------------------------------------------------------------------------------------
    def check(self, adaptation: Adaptation) -> None:
        """Raise ValueError for an adaptation this engine cannot serve (cheap: shapes and ranks only)."""
        if adaptation.sapt is not None:
            rank = adaptation.sapt.bundle.num_tasks * adaptation.sapt.bundle.rank
            if rank > self.max_rank:
                raise ValueError(f"this SAPT bundle is a LoRA of rank {rank} (tasks x r); the vLLM engine "
                                 f"serves LoRA ranks up to {self.max_rank} (setting vllm_lora_max_rank)")
        if adaptation.svf is not None and self.runtime is None:
            raise ValueError("SVF experts need adapted matrices, and this server adapts none (adapt_targets)")

    def plan(self, adaptation: Adaptation) -> Plan:
        ident = (adaptation.key, self.svf_mode, self.budget, self.max_rank)
        with self._lock:
            plan = self._plans.get(ident)
        if plan is None:
            plan = self._plan(adaptation)  # outside the lock: two threads may plan the same adaptation once each
        with self._lock:
            self._plans[ident] = plan
            self._plans.move_to_end(ident)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        return plan

    def _plan(self, a: Adaptation) -> Plan:
        self.check(a)
        sapt_rank = a.sapt.bundle.num_tasks * a.sapt.bundle.rank if a.sapt is not None else 0
        plan = Plan(report={"label": a.label, "svf": None, "sapt_rank": sapt_rank})
        svf_lora_rank = 0
        if a.svf is not None:
            plan.svf = "swap"
            if self.svf_mode == "lora":
                kept, reports = self._truncate(a)
                svf_lora_rank = max((r.rank for r in reports), default=0)
                plan.report.update(budget=self.budget, max_rank=self.max_rank, rank=svf_lora_rank,
                                   max_rel_error=max((r.rel_error for r in reports), default=0.0),
                                   matrices=[r.to_dict() for r in reports])
                if svf_lora_rank + sapt_rank <= self.max_rank:
                    plan.svf, plan.kept = "lora", {n: k for n, k in kept.items() if len(k)}
                else:
                    plan.report["fallback"] = (f"needs LoRA rank {svf_lora_rank + sapt_rank} > {self.max_rank} "
                                               f"for relative error <= {self.budget}: served by swapping weights")
                    log.info("adaptation %s: %s", a.label or a.key, plan.report["fallback"])
            if plan.svf == "swap":
                plan.weights = Adaptation(svf=a.svf, label=a.label)
                plan.weights_key = plan.weights.key
        plan.report["svf"] = plan.svf
        if plan.kept or a.sapt is not None:
            h = hashlib.sha256()
            if plan.kept:
                h.update(f"svf:{Adaptation(svf=a.svf).key}:{self.budget}:{svf_lora_rank}".encode())
            if a.sapt is not None:
                h.update(f"sapt:{Adaptation(sapt=a.sapt).key}".encode())
            plan.lora_key = h.hexdigest()[:32]
        return plan

    def _truncate(self, a: Adaptation):
        scales = a.svf.scales(self.sigma)
        kept, reports = {}, []
        for name in self.layers:
            if name in scales:
                kept[name], rep = svf_truncation(name, self.sigma[name], scales[name], self.budget)
                reports.append(rep)
        return kept, reports

    def report(self, adaptation: Adaptation | None) -> dict:
        """How ``adaptation`` is served: for SVF in lora mode, the rank and relative error per matrix."""
        if adaptation is None:
            return {"svf": None, "sapt_rank": 0}
        plan = self.plan(adaptation)
        out = dict(plan.report)
        adapter = self.cache.get(plan.lora_key) if plan.lora_key else None
        if adapter is not None:
            out.update(lora_id=adapter.lora_id, adapter_path=str(adapter.path))
        return out

    # --- serving -------------------------------------------------------------------------------------
    async def route(self, adaptation: Adaptation | None) -> Route:
        if adaptation is None:
            return Route(BASE)
        plan = await asyncio.to_thread(self.plan, adaptation)
        if plan.lora_key is None:
            return Route(plan)
        adapter = await self.cache.acquire(plan.lora_key, lambda path: self.build(adaptation, plan, path))
        return Route(plan, adapter)

    async def release(self, route: Route) -> None:
        if route.adapter is not None:
            adapter, route.adapter = route.adapter, None
            await self.cache.release(adapter)

    def loras(self, a: Adaptation, plan: Plan) -> dict[str, LoraFactors]:
        """The adapter's factors per matrix (exact SAPT mixture plus the truncated SVF change)."""
        parts: dict[str, list[LoraFactors]] = {}
        with torch.no_grad():
            if plan.kept:
                scales = a.svf.scales(self.sigma)
                for name, idx in plan.kept.items():
                    layer = self.layers[name]
                    parts.setdefault(name, []).append(svf_lora(layer.U, layer.S, scales[name], layer.Vh, idx))
            if a.sapt is not None:
                bundle = a.sapt.bundle
                for name, (A_cat, B_cat) in bundle.stacked_lora().items():
                    parts.setdefault(name, []).append(sapt_lora(A_cat, B_cat, a.sapt.attention, bundle.rank))
        return {name: concat(p) for name, p in parts.items()}

    def build(self, a: Adaptation, plan: Plan, path: Path) -> dict:
        write_peft_adapter(path, self.loras(a, plan), self.model_name, self.dtype, report=plan.report)
        return plan.report
