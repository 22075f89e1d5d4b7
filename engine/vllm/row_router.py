"""The front end of per-row adaptation (``engine.vllm.rows``): what a request carries, what workers hold.

A request's adaptation travels as a small recipe in ``SamplingParams.extra_args`` (expert digests and
their α; a SAPT bundle's key and the request's attention), which each worker turns into the request's
scale row when vLLM admits it. Before a request is sent, every expert and SAPT bundle its recipe names is
registered on every worker (``t2_rows_put_*``, once per content) and pinned until the request ends;
experts beyond ``max_experts`` and bundles that need the bank's room are dropped least recently used,
never while a request holds them. A bundle that finds the bank full of bundles in use waits for one
to be released: a request is never served with another request's weights.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch

from adapters.adaptation import Adaptation
from adapters.targets import Target
from engine.vllm.rows import first_fit

log = logging.getLogger("t2serve.vllm")

Rpc = Callable[[str, tuple], Awaitable[list]]


@dataclass
class _Entry:
    refs: int = 0
    ready: asyncio.Future | None = None  # set once every worker has it


@dataclass
class Lease:
    """What one request holds while it runs: its recipe and the worker-side entries it pins."""

    recipe: dict
    salt: str
    pins: list[_Entry] = field(default_factory=list)
    bundle: bool = False  # one of the pins is a SAPT bundle: a release may make room in the bank


class RowsView:
    """What the HTTP edge validates adaptations against on the rows path (``engine.runtime``)."""

    def __init__(self, targets: list[Target], sapt_rank: int, svf: bool = True):
        self.targets = targets
        self.svf = svf
        self.layers: list = []
        self.sapt_rank = sapt_rank
        self._k = {t.name: t.rank for t in targets}

    def validate(self, adaptation: Adaptation) -> None:
        if adaptation.svf is not None:
            if not self.svf:
                raise ValueError("this server serves no SVF experts on vLLM (vllm_svf off: the SAPT bank alone)")
            for name in adaptation.svf.target_names:
                if name not in self._k:
                    raise ValueError(f"expert matrix {name} is not adapted by this server")
                k = adaptation.svf.experts[0].z[name].shape[0]
                if k != self._k[name]:
                    raise ValueError(f"{name}: z has {k} values, the matrix has {self._k[name]}")
        if adaptation.sapt is not None:
            bundle = adaptation.sapt.bundle
            width = bundle.num_tasks * bundle.rank
            if width > self.sapt_rank:
                raise ValueError(f"this SAPT bundle has rank {width} (tasks x r); this server's SAPT bank holds "
                                 f"{self.sapt_rank} (setting vllm_sapt_bank)")
            if bundle.prompt_len:
                raise ValueError("SAPT soft prompts are not served by the vLLM engine")
            missing = [n for n in bundle.target_names if n not in self._k]
            if missing:
                raise ValueError(f"SAPT matrices not adapted by this server: {missing[:3]}")


def bundle_key(bundle) -> str:
    """Content key of a bundle's weights (memoised on the bundle until its version changes)."""
    version = bundle.version()
    memo = bundle.__dict__.get("_t2_rows_key")
    if memo is None or memo[0] != version:
        memo = bundle.__dict__["_t2_rows_key"] = (version, hashlib.sha256(repr(version).encode()).hexdigest()[:32])
    return memo[1]


class RowRouter:
    def __init__(self, rpc: Rpc, scratch: Path, view: RowsView, max_experts: int = 256):
        self.rpc, self.scratch, self.view, self.max_experts = rpc, scratch, view, max_experts
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._experts: OrderedDict[str, _Entry] = OrderedDict()
        self._bundles: OrderedDict[str, _Entry] = OrderedDict()
        self._dropping: dict[str, asyncio.Future] = {}  # keys whose drop is on its way to the workers
        self._placed: dict[str, tuple[int, int]] = {}  # bundle -> (bank offset, width), as every worker has it
        self._room = asyncio.Condition()  # a bundle was released
        self.puts = 0  # registrations sent to the workers (a figure for tests and stats)
        self.bank_waits = 0  # times a bundle waited for room in the bank
        self._checked: set[str] = set()  # expert digests (first of a mixture) and bundle keys validated here
        self.acquire_s = 0.0  # wall seconds in acquire, registrations included (a figure for benchmarks)

    def check(self, adaptation: Adaptation) -> None:
        self.view.validate(adaptation)

    # --- requests ---------------------------------------------------------------------------------------
    async def acquire(self, adaptation: Adaptation | None) -> Lease | None:
        """Pin what ``adaptation`` names on the workers and return its recipe. Every request of a unique
        workload comes through here, so its cost is kept per request, not per matrix: expert digests and
        bundle keys are memoised by the frozen objects, a validation is remembered per expert set or
        bundle, and the prefix-cache salt is hashed from the recipe."""
        if adaptation is None:
            return None
        t0 = time.perf_counter()
        lease = Lease(recipe={}, salt="")
        salt = hashlib.sha256()
        try:
            if adaptation.svf is not None:
                mix = adaptation.svf
                digests = [e.digest() for e in mix.experts]
                if digests[0] not in self._checked:
                    self.view.validate(Adaptation(svf=mix))
                    self._checked.add(digests[0])
                for e, digest in zip(mix.experts, digests):
                    await self._pin(lease, self._experts, digest, lambda e=e, d=digest: self._put_expert(d, e))
                alpha = mix.alpha.detach().float().cpu()
                targets = list(mix.alpha_targets) if mix.alpha_targets else None
                lease.recipe["svf"] = {"experts": digests, "alpha": alpha.tolist(), "targets": targets}
                salt.update(f"svf|{mix.parametrization}|{','.join(digests)}|{targets}|".encode())
                salt.update(alpha.double().numpy().tobytes())
            if adaptation.sapt is not None:
                bundle = adaptation.sapt.bundle
                key = bundle_key(bundle)
                if key not in self._checked:
                    self.view.validate(Adaptation(sapt=adaptation.sapt))
                    self._checked.add(key)
                await self._pin(lease, self._bundles, key, lambda: self._put_bundle(key, bundle))
                lease.bundle = True
                attention = adaptation.sapt.attention.detach().float().cpu()
                lease.recipe["sapt"] = {"bundle": key, "attention": attention.tolist()}
                salt.update(f"|sapt|{key}|".encode())
                salt.update(attention.double().numpy().tobytes())
        except BaseException:
            await self.release(lease)
            raise
        lease.salt = salt.hexdigest()[:32]
        await self._trim_experts()
        self.acquire_s += time.perf_counter() - t0
        return lease

    async def release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        for entry in lease.pins:  # the entries themselves: one dropped meanwhile is no one else's
            entry.refs -= 1
        lease.pins = []
        if lease.bundle:
            lease.bundle = False
            async with self._room:
                self._room.notify_all()

    async def _pin(self, lease: Lease, table: OrderedDict, key: str, put: Callable[[], Awaitable[None]]) -> None:
        """Hold ``table[key]`` for ``lease``, registering it on the workers first if needed."""
        while key in self._dropping:  # a drop of this key is on its way to the workers: put it back after
            await asyncio.shield(self._dropping[key])
        entry = table.get(key)
        if entry is None:
            entry = table[key] = _Entry(ready=asyncio.get_running_loop().create_future())
            entry.refs += 1
            lease.pins.append(entry)
            try:
                await put()
            except BaseException as e:
                if table.get(key) is entry:
                    del table[key]
                entry.ready.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
                entry.ready.exception()  # retrieved: waiters re-raise it themselves
                raise
            entry.ready.set_result(None)
        else:
            entry.refs += 1
            lease.pins.append(entry)
            await asyncio.shield(entry.ready)
        table.move_to_end(key)

    async def _drop(self, table: OrderedDict, key: str, method: str) -> None:
        """Remove an idle entry here and on the workers; pins of the same key wait until the drop is done."""
        del table[key]
        done = self._dropping[key] = asyncio.get_running_loop().create_future()
        try:
            await self.rpc(method, (key,))
        finally:
            del self._dropping[key]
            done.set_result(None)

    # --- workers ----------------------------------------------------------------------------------------
    async def _put_expert(self, digest: str, expert) -> None:
        from safetensors.torch import save_file

        path = self.scratch / f"expert-{digest[:32]}.safetensors"
        await asyncio.to_thread(save_file, {n: v.detach().float().contiguous().cpu() for n, v in expert.z.items()},
                                str(path))
        try:
            await self.rpc("t2_rows_put_expert", (digest, str(path), expert.parametrization))
            self.puts += 1
        finally:
            path.unlink(missing_ok=True)

    async def _trim_experts(self) -> None:
        while len(self._experts) > self.max_experts:
            # chosen and removed with no await in between: an entry pinned meanwhile is never the one dropped
            idle = next((d for d, e in self._experts.items() if e.refs == 0 and e.ready.done()), None)
            if idle is None:
                return
            await self._drop(self._experts, idle, "t2_rows_drop_expert")

    async def _put_bundle(self, key: str, bundle) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, (A, B) in bundle.stacked_lora().items():
            tensors[f"{name}.A"] = A.detach().float().contiguous().cpu()
            tensors[f"{name}.B"] = B.detach().float().contiguous().cpu()
        width = bundle.num_tasks * bundle.rank
        while True:
            offset = first_fit(list(self._placed.values()), width, self.view.sapt_rank)
            if offset is not None:
                break
            if not await self._evict_bundle(key):
                self.bank_waits += 1
                async with self._room:  # every bundle in the bank is in use: wait for a release
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._room.wait(), 1.0)
        self._placed[key] = (offset, width)
        path = self.scratch / f"bundle-{key}.safetensors"
        try:
            await asyncio.to_thread(save_file, tensors, str(path))
            await self.rpc("t2_rows_put_bundle", (key, str(path), bundle.rank, offset))
            self.puts += 1
        except BaseException:
            self._placed.pop(key, None)
            raise
        finally:
            path.unlink(missing_ok=True)

    async def _evict_bundle(self, keep: str) -> bool:
        idle = next((k for k, e in self._bundles.items() if k != keep and e.refs == 0 and e.ready.done()), None)
        if idle is None:
            return False
        self._placed.pop(idle, None)
        await self._drop(self._bundles, idle, "t2_rows_drop_bundle")
        return True

    def stats(self) -> dict[str, Any]:
        return {"experts": len(self._experts), "bundles": len(self._bundles), "registrations": self.puts,
                "bank_waits": self.bank_waits, "acquire_s": round(self.acquire_s, 4)}
