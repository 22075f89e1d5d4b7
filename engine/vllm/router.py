"""How one request's adaptation is served on vLLM, decided once per distinct adaptation.

- no adaptation: the base weights;
- SAPT weights: a LoRA adapter of rank T·r with the request's attention folded in (exact);
- SVF experts: the merged weights, swapped in for the request's group (exact).
An adaptation with both parts gets both: its SAPT adapter over its swapped weights.
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
from adapters.lora_export import LoraFactors, concat, sapt_lora
from engine.vllm.adapter_cache import Adapter, AdapterCache
from engine.vllm.peft_folder import write_peft_adapter

log = logging.getLogger("t2serve.vllm")

SVF_MODES = ("swap",)


@dataclass
class Plan:
    """What serving one adaptation takes."""

    weights_key: str | None = None  # key of the swapped weights (None: the base weights)
    weights: Any = None  # the SVF-only Adaptation whose merged weights are swapped in
    lora_key: str | None = None  # content key of the adapter (None: no adapter)
    svf: str | None = None  # how the SVF part is served: "swap" | None
    report: dict = field(default_factory=dict)


BASE = Plan()


@dataclass
class Route:
    plan: Plan
    adapter: Adapter | None = None


class Router:
    def __init__(self, runtime, cache: AdapterCache, model_name: str, dtype: torch.dtype, *,
                 svf_mode: str = "swap", max_rank: int = 64, max_plans: int = 1024):
        if svf_mode not in SVF_MODES:
            raise ValueError(f"svf mode must be one of {SVF_MODES}, got {svf_mode!r}")
        self.runtime, self.cache, self.model_name, self.dtype = runtime, cache, model_name, dtype
        self.svf_mode, self.max_rank = svf_mode, max_rank
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
        ident = (adaptation.key, self.svf_mode, self.max_rank)
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
        if a.svf is not None:
            plan.svf = "swap"
            plan.weights = Adaptation(svf=a.svf, label=a.label)
            plan.weights_key = plan.weights.key
        plan.report["svf"] = plan.svf
        if a.sapt is not None:
            plan.lora_key = hashlib.sha256(f"sapt:{Adaptation(sapt=a.sapt).key}".encode()).hexdigest()[:32]
        return plan

    def report(self, adaptation: Adaptation | None) -> dict:
        """How ``adaptation`` is served: SVF swapped or not, the SAPT adapter's rank and folder."""
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
        """The adapter's factors per matrix: the request's exact SAPT mixture."""
        parts: dict[str, list[LoraFactors]] = {}
        with torch.no_grad():
            bundle = a.sapt.bundle
            for name, (A_cat, B_cat) in bundle.stacked_lora().items():
                parts.setdefault(name, []).append(sapt_lora(A_cat, B_cat, a.sapt.attention, bundle.rank))
        return {name: concat(p) for name, p in parts.items()}

    def build(self, a: Adaptation, plan: Plan, path: Path) -> dict:
        write_peft_adapter(path, self.loras(a, plan), self.model_name, self.dtype, report=plan.report)
        return plan.report
