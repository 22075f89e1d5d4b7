"""Thin SVD of every target matrix, computed once and cached on disk.

SVF rescales singular values, so every target W (out × in) needs W = U diag(σ) Vᵀ. Computing that for
a whole model takes minutes on CPU, so the factors are written to ``<cache_dir>/<key>.safetensors``,
keyed by a fingerprint of the weights and the target set, and reused on the next start.

- The SVD runs in float32 (float64 for float64 weights) on the weight's own device; U and Vᵀ are then
  kept (and stored) in the weight's dtype, σ in float32, so the hot path never converts.
- A file is trusted only if its header names the same key and targets and the sha256 of its tensor
  bytes matches the header; anything else (partial write, bit rot, shape change) is rebuilt with a
  warning. Writes go through ``adapters.atomic`` (temp file, fsync, rename, folder fsync), so a crash
  never leaves a half-written file under the real name. A writer holds a file lock per key (``.<key>.lock``), so
  processes starting together compute the factors once, and it removes temp files of its key that a
  killed writer left behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from adapters.atomic import TMP_SUFFIX, atomic_write
from adapters.targets import Target, weight_matrix

log = logging.getLogger(__name__)

FORMAT = "t2serve-svd/1"
_SAMPLE = 4096  # values per matrix in the fingerprint


@dataclass
class SVDFactors:
    """W = U diag(S) Vh for one target (rows of Vh are the right singular vectors)."""

    U: torch.Tensor  # (out, k), weight dtype and device
    S: torch.Tensor  # (k,) float32 (float64 for float64 weights), descending
    Vh: torch.Tensor  # (k, in), weight dtype and device


class CacheError(Exception):
    """A cache file that must not be trusted."""


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through the eigendecomposition of the k × k Gram matrix (W Wᵀ or Wᵀ W) in float64, the
    other side as Σ⁻¹ Uᵀ W: one GEMM and a symmetric eigenproblem instead of a full SVD (several times
    faster; bench/svd_drivers.py). float64 keeps the squared condition number harmless: the
    reconstruction error is that of torch.linalg.svd, V is as orthogonal. -> (U, σ, Vh) in float32."""
    wd = w.double()
    wide = wd.shape[0] <= wd.shape[1]
    lam, vec = torch.linalg.eigh(wd @ wd.T if wide else wd.T @ wd)
    s = lam.flip(0).clamp_min(0).sqrt()
    vec = vec.flip(1)
    inv = torch.where(s > s[0] * 1e-12, 1 / s, torch.zeros_like(s))  # a null direction stays 0, not inf
    if wide:
        U, Vh = vec, (vec.T @ wd) * inv[:, None]
    else:
        U, Vh = (wd @ vec) * inv[None, :], vec.T
    return U.float(), s.float(), Vh.float()


def thin_svd(w: torch.Tensor) -> SVDFactors:
    """Thin SVD of w (out, in) in float32+, factors cast back to w's dtype (σ stays float32+): through
    ``gram_svd`` (GPU: 8x faster than torch.linalg.svd for a Llama-3-8B MLP matrix; CPU: 2-4x for
    SmolLM2's), torch.linalg.svd for float64 weights."""
    wf = w.detach().to(_svd_dtype(w.dtype))
    if w.dtype != torch.float64:
        U, S, Vh = gram_svd(wf)
    else:
        U, S, Vh = torch.linalg.svd(wf, full_matrices=False)  # (out,k), (k,), (k,in)
    return SVDFactors(U.to(w.dtype).contiguous(), S.contiguous(), Vh.to(w.dtype).contiguous())


def _modules(model: nn.Module, targets: Sequence[Target]) -> list[nn.Module]:
    mods = dict(model.named_modules())
    return [mods[t.name] for t in targets]


def weights_fingerprint(weights: Iterable[torch.Tensor]) -> str:
    """Cheap identity of a set of matrices: shape, dtype, a float64 sum and a strided sample each.

    O(one read of the weights) — far below the SVD — yet any realistic change (another checkpoint,
    fine-tuned weights, a dtype change) moves the sum or the sample.
    """
    h = hashlib.sha256()
    for w in weights:
        w = w.detach()
        flat = w.reshape(-1)
        n, m = flat.numel(), min(_SAMPLE, flat.numel())
        # Evenly strided indices in int64: a float linspace rounds past the end for big matrices.
        idx = torch.arange(m, device=w.device, dtype=torch.long) * (n - 1) // max(m - 1, 1)
        sample = flat[idx].to(torch.float64).cpu()
        h.update(f"{tuple(w.shape)}|{w.dtype}|{float(w.sum(dtype=torch.float64)):.17g}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, targets: Sequence[Target]) -> str:
    spec = json.dumps([FORMAT, fingerprint, [t.name for t in targets]])
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


def _tensor_names(t: Target) -> tuple[str, str, str]:
    return f"{t.name}.U", f"{t.name}.S", f"{t.name}.Vh"


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for x in tensors:
        h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, key: str, targets: Sequence[Target], weights: Sequence[torch.Tensor]):
    """Factors from ``path`` on each weight's device/dtype; raises CacheError if untrustworthy."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise CacheError("header names another format or key")
            if json.loads(meta.get("targets", "[]")) != [t.name for t in targets]:
                raise CacheError("header names other targets")
            h = hashlib.sha256()
            out: dict[str, SVDFactors] = {}
            for t, w in zip(targets, weights):
                U, S, Vh = (f.get_tensor(n) for n in _tensor_names(t))
                k = t.rank
                if U.shape != (t.out_features, k) or S.shape != (k,) or Vh.shape != (k, t.in_features):
                    raise CacheError(f"{t.name}: stored shapes do not match the model")
                for x in (U, S, Vh):
                    h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                out[t.name] = SVDFactors(
                    U.to(w.device, w.dtype), S.to(w.device, _svd_dtype(w.dtype)), Vh.to(w.device, w.dtype)
                )
            if h.hexdigest() != meta.get("sha256"):
                raise CacheError("tensor checksum mismatch")
            return out
    except CacheError:
        raise
    except Exception as e:  # truncated header, missing tensor, I/O error: all mean "rebuild"
        raise CacheError(f"{type(e).__name__}: {e}") from e


def _progress(items: Sequence, enabled: bool, desc: str):
    if enabled:
        return tqdm(items, desc=desc, unit="matrix")
    return items


def _cached(path: Path, key: str, targets: Sequence[Target], weights: Sequence[torch.Tensor], warn: bool = True):
    """The factors stored at ``path`` if it holds a trustworthy file, else None."""
    if not path.exists():
        return None
    try:
        factors = _read(path, key, targets, weights)
    except CacheError as e:
        if warn:
            log.warning("SVD cache %s is corrupt or partial (%s); recomputing", path, e)
        return None
    log.info("SVD factors of %d matrices loaded from %s", len(targets), path)
    try:
        os.utime(path)  # last used now: the cache is pruned least recently used first (engine/cache.py)
    except OSError:
        pass  # a read-only cache
    return factors


def _compute(targets: Sequence[Target], weights: Sequence[torch.Tensor], progress: bool,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, SVDFactors]:
    out = {}
    for i, (t, w) in enumerate(_progress(list(zip(targets, weights)), progress, "SVD of target matrices")):
        out[t.name] = thin_svd(w)
        if on_progress is not None:
            on_progress(i + 1, len(targets))
    return out


def load_or_compute(
    model: nn.Module,
    targets: Sequence[Target],
    cache_dir: str | os.PathLike | None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, SVDFactors]:
    """SVD factors of every target, from ``cache_dir`` when a valid file exists, else computed (and
    written there). ``cache_dir=None`` computes without touching the disk. ``on_progress(done, total)``
    is called after each matrix computed."""
    weights = [weight_matrix(m.weight, t.kind) for m, t in zip(_modules(model, targets), targets)]
    return load_or_compute_matrices(weights, targets, cache_dir, progress, on_progress)


def load_or_compute_matrices(
    weights: Sequence[torch.Tensor],
    targets: Sequence[Target],
    cache_dir: str | os.PathLike | None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, SVDFactors]:
    """``load_or_compute`` for matrices held outside a Hugging Face model (``weights[i]`` is target
    ``i``'s W as (out, in)): the vLLM workers' own weights use the same cache as the native engine."""
    key = cache_key(weights_fingerprint(weights), targets)
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is None:
        return _compute(targets, weights, progress, on_progress)
    factors = _cached(path, key, targets, weights)  # no lock for reading: the folder may be read-only
    if factors is not None:
        return factors
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer per key: servers starting together compute the factors once, and a writer that holds
    # the lock knows that any temporary file of this key was left by a writer that died (SIGKILL).
    with FileLock(path.parent / f".{key}.lock"):
        factors = _cached(path, key, targets, weights, warn=False)  # written while we waited for the lock?
        if factors is not None:
            return factors
        for leftover in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            log.warning("removing %s, left by an interrupted write", leftover)
            leftover.unlink(missing_ok=True)
        factors = _compute(targets, weights, progress, on_progress)
        tensors: dict[str, torch.Tensor] = {}
        for t in targets:
            f = factors[t.name]
            for n, x in zip(_tensor_names(t), (f.U, f.S, f.Vh)):
                tensors[n] = x.detach().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "key": key,
            "targets": json.dumps([t.name for t in targets]),
            "sha256": _digest(tensors.values()),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        log.info("SVD factors of %d matrices written to %s", len(targets), path)
    return factors
