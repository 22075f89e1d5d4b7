"""The front end of a weight swap: the merged weights of an SVF adaptation, loaded by vLLM's workers.

W' = W + U diag(s − σ) Vᵀ is computed here from the host copy of the model and its SVD factors (the
native engine's ``merged_delta_weight``, on the GPU when there is one, one matrix at a time), written
into one safetensors file and loaded by every worker through ``collective_rpc`` (``worker.py``), which
places each matrix in its slot and shard. Matrices the new adaptation leaves alone but the previous one
changed get their base weights back in the same file. After the load the prefix cache is reset (its
entries were computed with the old weights). Called by the swap gate only while no request runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
from safetensors.torch import save_file

from adapters.svf import merged_delta_weight
from adapters.targets import weight_matrix

log = logging.getLogger("t2serve.vllm")

RPC_LOAD = "t2_load_weights"


def scratch_dir(root: Path, nbytes: int) -> Path:
    """Where a swap file of ``nbytes`` goes: /dev/shm (memory) when it has room for it twice, else ``root``."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
            return shm
    except OSError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    return root


class WeightSwapper:
    """``await swapper(key, adaptation)`` loads the adaptation's merged weights (None: the base weights).

    ``rpc(method, args)`` is vLLM's ``collective_rpc`` (a list, one result per worker);
    ``reset_prefix_cache()`` vLLM's (True once reset)."""

    def __init__(self, runtime, rpc: Callable[[str, tuple], Awaitable[list]],
                 reset_prefix_cache: Callable[[], Awaitable[bool]], root: Path,
                 compute_device: torch.device | None = None):
        self.runtime = runtime
        self.layers = {layer.name: layer for layer in runtime.layers}
        self.order = {name: i for i, name in enumerate(self.layers)}
        self.sigma = {name: layer.S for name, layer in self.layers.items()}
        self.rpc, self.reset_prefix_cache, self.root = rpc, reset_prefix_cache, Path(root)
        cuda = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.device = compute_device or cuda
        self.modified: set[str] = set()  # matrices not at their base weights in vLLM
        self.loaded: str | None = None  # key of the adaptation loaded

    def scales(self, adaptation) -> dict[str, torch.Tensor]:
        return {} if adaptation is None else adaptation.svf.scales(self.sigma)

    def merged(self, name: str, s: torch.Tensor | None) -> torch.Tensor:
        """W' (out, in) of one matrix in the model dtype, on the CPU (W itself when s is None)."""
        layer = self.layers[name]
        W = weight_matrix(layer.weight, layer.target.kind)
        if s is None:
            return W.detach().contiguous().cpu()
        dev = self.device
        with torch.no_grad():
            w = merged_delta_weight(W.to(dev), layer.U.to(dev), layer.S.to(dev), s.to(dev), layer.Vh.to(dev))
        return w.contiguous().cpu()

    def write(self, adaptation, names: list[str]) -> Path:
        scales = self.scales(adaptation)
        nbytes = sum(self.layers[n].weight.numel() * self.layers[n].weight.element_size() for n in names)
        fd, tmp = tempfile.mkstemp(prefix="t2-swap-", suffix=".safetensors", dir=scratch_dir(self.root, nbytes))
        os.close(fd)
        try:
            save_file({n: self.merged(n, scales.get(n)) for n in names}, tmp)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the GPU memory is vLLM's: give the merge's back
        return Path(tmp)

    async def __call__(self, key: str | None, adaptation: Any) -> None:
        covered = set(self.scales(adaptation)) if adaptation is not None else set()
        names = sorted(covered | self.modified, key=self.order.__getitem__)
        if names:
            path = await asyncio.to_thread(self.write, adaptation, names)
            try:
                self.modified |= set(names)  # until the load is confirmed, these are in doubt
                counts = await self.rpc(RPC_LOAD, (str(path),))
            finally:
                path.unlink(missing_ok=True)
            if not counts or any(c != len(names) for c in counts):
                raise RuntimeError(f"workers loaded {counts} of {len(names)} matrices")
        self.modified, self.loaded = covered, key
        for _ in range(100):
            if await self.reset_prefix_cache():
                return
            await asyncio.sleep(0.05)
        # Requests carry the loaded weights' key as cache salt, so stale blocks are never reused anyway.
        log.warning("vLLM did not reset its prefix cache after a swap")
