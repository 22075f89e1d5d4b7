"""Engine-facing entry point: per-step adaptation tables.

The engine never looks inside an adaptation. When its batch composition changes it passes the
adaptation of each batch row (``None`` = the base weights) to ``plan``, and runs every forward inside
``activate(table)``. Layers read the active table; they never look experts up themselves.

Cost model (what plan decides, per target layer):
- No adapted row -> ``plan`` returns None and every layer runs plain x Wᵀ: the base model's cost.
- Rows with SVF -> factored path ((x V) ⊙ s[row]) Uᵀ for the whole batch. It reads U and V instead of
  W: (out + in)·k vs out·in values, 1.29× for Llama-3-8B's MLP, 1.375× for SmolLM2's; in a
  memory-bound decode step that ratio is the cost. Rows without SVF get s = σ (W within rounding):
  splitting them off through x Wᵀ exactly, paying for W and U, V both, measured slower (SmolLM2/CPU,
  16 of 32 rows base: 1.4-1.5× base vs 1.1-1.3× with s = σ), so there is no such split.
- Every row shares one SVF adaptation -> after ``merge_after`` activations of such tables, a merged W'
  is built once (one out×k×in GEMM per target), kept in an LRU of ``max_merged`` adaptations, and used
  by all later tables with that single adaptation: one GEMM on W', exactly the base cost. Rule (as in
  ski rental): merge once the steps already paid at the factored price would have paid for the build,
  i.e. ``merge_after`` ≈ build time / per-step gain, which bench/adapt.py prints ("pays off after");
  measured on SmolLM2/CPU: ~1 s build vs ~35 ms gain per step (25 steps), hence the default 32.
  Never more than about twice the best cost in hindsight. Each merged copy costs the full size of
  the target matrices.
- SAPT rows add a rank-T·r LoRA term per bundle; rows without it carry scale 0.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from adapters.adaptation import Adaptation
from adapters.layer import ActiveTable, AdaptiveLinear, TargetStep
from adapters.sapt import row_lora_scale
from adapters.svf import merged_delta_weight
from adapters.targets import Target, weight_matrix


@dataclass
class StepTable:
    """Which adaptation each row of one forward uses."""

    rows: torch.Tensor  # (B,) int64: index into `adaptations`, -1 = base weights
    adaptations: list[Any]  # the distinct adaptations of this step, in index order
    layer_state: dict[str, Any] = field(default_factory=dict)  # target name -> TargetStep
    merge_key: str | None = None  # key of the one SVF adaptation all rows share, while not yet merged


@dataclass
class _Resolved:
    """One adaptation's SVF scale vectors for all targets, concatenated in target order."""

    flat: torch.Tensor  # (Σk,) model dtype: s of covered targets, σ elsewhere
    flat_hp: torch.Tensor  # (Σk,) float32+: the same, for building merged weights
    covered: frozenset[int]  # indices of targets the mixture adapts
    uses: int = 0  # activations of tables in which it was the only adaptation


class AdaptationRuntime:
    """Owns the adapted model's per-step state. With no adapted layers installed every row is the base.

    Options: ``max_resolved`` adaptations keep their scale vectors cached (LRU); ``max_merged``
    merged weight sets are kept (0 disables merging); ``merge_after`` activations of a single-
    adaptation table trigger the merge.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_resolved: int = 128,
        max_merged: int = 1,
        merge_after: int = 32,
        expected: Sequence[Target] | None = None,
    ):
        """``expected``: the targets whose layers are still being prepared (their SVD computed in the
        background): until ``scan`` finds them installed, adaptations are validated against them but not
        served (``ready`` is False)."""
        self.model = model
        self.max_resolved, self.max_merged, self.merge_after = max_resolved, max_merged, merge_after
        self._expected = list(expected or [])
        self.scan()

    @property
    def ready(self) -> bool:
        """Whether adapted rows can be served (the expected layers, if any, are installed)."""
        return bool(self.layers) or not self._expected

    def scan(self) -> None:
        """(Re)read the installed adaptive layers: after ``adapters.install_factors`` put them in."""
        model = self.model
        self.layers: list[AdaptiveLinear] = [m for m in model.modules() if isinstance(m, AdaptiveLinear)]
        self.targets = [layer.target for layer in self.layers] or list(self._expected)
        self._slot = ActiveTable()
        for layer in self.layers:  # the last runtime made for a model drives its layers
            layer.slot = self._slot
        self._index = {t.name: i for i, t in enumerate(self.targets)}
        ks = [t.rank for t in self.targets]
        self._offsets = [sum(ks[:i]) for i in range(len(ks))]
        if self.layers:
            self.device, self.dtype = self.layers[0].U.device, self.layers[0].U.dtype
            self._sigma = {layer.name: layer.S for layer in self.layers}
            self._sigma_flat = torch.cat([layer.S for layer in self.layers]).to(self.dtype)  # (Σk,)
        self._resolved: OrderedDict[str, _Resolved] = OrderedDict()
        self._merged: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        # The experts each cached key was computed from, weakly: once one is gone from everywhere (deleted
        # or replaced, and no request holds it), its entries are dropped at the next plan instead of
        # holding their memory (a merged copy is the size of the target matrices) until the LRU evicts.
        self._sources: dict[str, tuple[weakref.ref, ...]] = {}

    # --- engine API --------------------------------------------------------------------------------

    def validate(self, adaptation: Adaptation) -> None:
        """Raise ValueError if ``adaptation`` does not fit the installed targets.

        Names and shapes only: no tensor math and no cache access, so the HTTP edge may call it from
        any thread while the engine thread plans steps.
        """
        if adaptation.svf is not None:
            for e in adaptation.svf.experts:
                for name, z in e.z.items():
                    if name not in self._index:
                        raise ValueError(f"expert matrix {name} is not an installed target")
                    k = self.targets[self._index[name]].rank
                    if z.shape[0] != k:
                        raise ValueError(f"{name}: z of {e.name!r} has {z.shape[0]} values, the matrix has {k}")
        if adaptation.sapt is not None:
            self._check_sapt_targets(adaptation)

    def plan(self, rows: Sequence[Adaptation | None]) -> StepTable | None:
        """Table for a batch whose row i carries ``rows[i]``; ``None`` when no row is adapted."""
        self._drop_unloaded()
        if all(r is None for r in rows):
            return None
        if not self.layers:
            raise RuntimeError("adapted rows need the adaptive layers installed (adapters.install)")
        distinct, keys, idx = self._dedupe(rows)
        row_idx = torch.tensor(idx, dtype=torch.long, device=self.device)  # (B,)
        resolved = [self._resolve(a, k) for a, k in zip(distinct, keys)]
        table = StepTable(rows=row_idx, adaptations=distinct)
        if any(r is not None for r in resolved):
            uniform = len(distinct) == 1 and min(idx) >= 0 and keys[0] is not None
            if uniform and self.max_merged > 0 and keys[0] in self._merged:
                self._merged.move_to_end(keys[0])
                for name, w in self._merged[keys[0]].items():
                    table.layer_state[name] = TargetStep(merged=w)
            else:
                self._plan_factored(table, idx, resolved)
                if uniform and self.max_merged > 0:
                    table.merge_key = keys[0]
        self._plan_sapt(table, idx)
        return table

    @contextlib.contextmanager
    def activate(self, table: StepTable | None) -> Iterator[None]:
        """Run the model's forward inside this to apply ``table`` (None = base model)."""
        if table is not None and table.merge_key is not None:
            self._count_single_use(table)
        prev, self._slot.table = self._slot.table, table
        try:
            yield
        finally:
            self._slot.table = prev

    # --- helpers for callers other than the engine -------------------------------------------------

    @torch.no_grad()
    def merged_weights(self, adaptation: Adaptation) -> dict[str, torch.Tensor]:
        """W' (out, in) of every target the adaptation's SVF mixture covers (cached, LRU)."""
        key = adaptation.key
        if key not in self._merged:
            res = self._resolve(adaptation, key)
            if res is None:
                raise ValueError("merged weights exist for SVF adaptations only")
            self._store_merged(key, self._build_merged(res))
        self._merged.move_to_end(key)
        return self._merged[key]

    def clear_caches(self) -> None:
        self._resolved.clear()
        self._merged.clear()
        self._sources.clear()

    # --- internals ---------------------------------------------------------------------------------

    def _dedupe(self, rows):
        """Distinct adaptations by content key (identity for ones being trained) and row indices."""
        distinct, keys, idx, seen, by_object = [], [], [], {}, {}
        for a in rows:
            if a is None:
                idx.append(-1)
                continue
            if id(a) not in by_object:  # rows of one request share the object: hash it once
                cacheable = not (torch.is_grad_enabled() and a.requires_grad)
                by_object[id(a)] = (a.key if cacheable else ("id", id(a))), cacheable
            k, cacheable = by_object[id(a)]
            if k not in seen:
                seen[k] = len(distinct)
                distinct.append(a)
                keys.append(k if cacheable else None)
            idx.append(seen[k])
        return distinct, keys, idx

    def _resolve(self, a: Adaptation, key: str | None) -> _Resolved | None:
        """Scale vectors of ``a``'s SVF part, once per adaptation (LRU under ``key``); ``key=None``:
        being trained, computed with autograd and not cached."""
        if a.svf is None:
            return None
        cacheable = key is not None
        if cacheable and key in self._resolved:
            self._resolved.move_to_end(key)
            return self._resolved[key]
        with torch.no_grad() if cacheable else contextlib.nullcontext():
            scales = a.svf.scales(self._sigma)  # name -> (k,) float32+
            pieces = [scales.get(layer.name, layer.S) for layer in self.layers]
            flat_hp = torch.cat([p.to(self.device) for p in pieces])
            res = _Resolved(flat_hp.to(self.dtype), flat_hp, frozenset(self._index[n] for n in scales))
        if cacheable:
            self._resolved[key] = res
            self._sources[key] = tuple(weakref.ref(e) for e in a.svf.experts)
            while len(self._resolved) > self.max_resolved:
                self._resolved.popitem(last=False)
        return res

    def _drop_unloaded(self) -> None:
        """Forget cached scales and merged weights whose experts no longer exist (see ``_sources``)."""
        for key in [k for k, refs in self._sources.items() if any(r() is None for r in refs)
                    or (k not in self._resolved and k not in self._merged)]:
            del self._sources[key]
            self._resolved.pop(key, None)
            self._merged.pop(key, None)

    def _plan_factored(self, table: StepTable, idx: list[int], resolved: list[_Resolved | None]) -> None:
        flats = [self._sigma_flat] + [self._sigma_flat if r is None else r.flat for r in resolved]
        per_row = torch.stack(flats).index_select(0, table.rows + 1)  # (B, Σk); row -1 -> σ
        for ti in sorted(set().union(*(r.covered for r in resolved if r is not None))):
            t, off = self.targets[ti], self._offsets[ti]
            step = TargetStep(scale=per_row[:, None, off:off + t.rank])  # (B, 1, k) view
            table.layer_state[t.name] = step

    def _check_sapt_targets(self, a: Adaptation) -> None:
        bundle = a.sapt.bundle
        missing = [n for n in bundle.target_names if n not in self._index]
        if missing:
            raise ValueError(f"SAPT bundle adapts matrices that are not installed targets: {missing[:3]}")
        for name, shape in zip(bundle.target_names, bundle.shapes):
            t = self.targets[self._index[name]]
            if tuple(shape) != (t.out_features, t.in_features):
                raise ValueError(f"SAPT block of {name} is {tuple(shape)}, the matrix is {(t.out_features, t.in_features)}")

    def _plan_sapt(self, table: StepTable, idx: list[int]) -> None:
        """One LoRA term per distinct bundle; rows of other bundles or none get attention 0."""
        bundles: dict[int, list[int]] = {}
        for j, a in enumerate(table.adaptations):
            if a.sapt is not None:
                self._check_sapt_targets(a)
                bundles.setdefault(id(a.sapt.bundle), []).append(j)
        for owners in bundles.values():
            bundle = table.adaptations[owners[0]].sapt.bundle
            zero = torch.zeros(bundle.num_tasks)
            attn = torch.stack([  # (B, T): built on the host, one copy to the device; differentiable
                table.adaptations[j].sapt.attention.float().cpu() if j in owners else zero for j in idx
            ])
            scale = row_lora_scale(attn.to(self.device, self.dtype), bundle.rank)[:, None, :]  # (B, 1, T·r)
            for name, (A_cat, B_cat) in bundle.stacked_lora().items():
                step = table.layer_state.setdefault(name, TargetStep())
                step.lora.append((A_cat.to(self.device, self.dtype), B_cat.to(self.device, self.dtype), scale))

    def _count_single_use(self, table: StepTable) -> None:
        res = self._resolved.get(table.merge_key)
        if res is None:  # evicted meanwhile; keep the factored table
            table.merge_key = None
            return
        res.uses += 1
        if res.uses < self.merge_after:
            return
        with torch.no_grad():
            merged = self._build_merged(res)
        self._store_merged(table.merge_key, merged)
        for name, w in merged.items():
            step = table.layer_state[name]
            step.merged, step.scale = w, None
        table.merge_key = None

    def _build_merged(self, res: _Resolved) -> dict[str, torch.Tensor]:
        out = {}
        for ti in sorted(res.covered):
            layer, off = self.layers[ti], self._offsets[ti]
            s = res.flat_hp[off:off + layer.target.rank]
            W = weight_matrix(layer.weight, layer.target.kind)
            out[layer.name] = merged_delta_weight(W, layer.U, layer.S, s, layer.Vh).contiguous()
        return out

    def _store_merged(self, key: str, merged: dict[str, torch.Tensor]) -> None:
        self._merged[key] = merged
        while len(self._merged) > max(self.max_merged, 1):
            self._merged.popitem(last=False)
