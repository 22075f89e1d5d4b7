"""What one request is adapted with: plain data the engine carries around without looking inside.

- ``SVFExpert``: the tensor payload of one SVF expert, z (k,) per target module name.
- ``SVFMixture``: experts mixed by α (one per expert, or one per expert × matrix); z' = Σ α_k z_k.
- ``SAPTWeights``: a SAPT bundle and the request's attention vector over its tasks.
- ``Adaptation``: an SVF mixture and/or SAPT weights, with a stable ``key`` (same content, same key)
  that the runtime uses to cache the per-target scale vectors it resolves to.

Construct with ``Adaptation.expert(e)``, ``Adaptation.mixture({e1: .5, e2: .5})`` or
``Adaptation.sapt_weights(bundle, attention)``.  Tensors are treated as immutable once served (the store
freezes what it serves); in-place changes to experts not frozen are noticed through autograd's version
counters (training), and an adaptation whose tensors require gradients is never cached.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch

from adapters.sapt import SAPTBundle
from adapters.svf import Parametrization, check_parametrization, mix_z, svf_scale


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass(frozen=True, eq=False)
class SVFExpert:
    """One SVF expert: raw (pre-sigmoid for sakana) z per adapted matrix."""

    name: str
    z: Mapping[str, torch.Tensor]  # target module name ("model.layers.0.mlp.gate_proj") -> (k,)
    parametrization: Parametrization = "sakana"
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        check_parametrization(self.parametrization)
        if not self.z:
            raise ValueError(f"expert {self.name!r} has no z vectors")
        for n, v in self.z.items():
            if v.dim() != 1:
                raise ValueError(f"expert {self.name!r}: z of {n} must be 1-D, got shape {tuple(v.shape)}")

    @property
    def requires_grad(self) -> bool:
        return not self._memo.get("frozen") and any(v.requires_grad for v in self.z.values())

    def freeze(self) -> "SVFExpert":
        """Mark z final (as served): gradients off, and ``digest`` stops re-reading the in-place counters of
        every z (paid per request otherwise)."""
        for v in self.z.values():
            if v.is_leaf:
                v.requires_grad_(False)
        self._memo.pop("frozen", None)
        self.digest()
        self._memo["frozen"] = True
        return self

    def digest(self) -> str:
        """Content hash of (parametrization, z), recomputed only when a z changed in place (never once
        frozen)."""
        if self._memo.get("frozen"):
            return self._memo["digest"]
        version = tuple(v._version for v in self.z.values())
        if self._memo.get("version") != version:
            h = hashlib.sha256(self.parametrization.encode())
            for n in sorted(self.z):
                h.update(n.encode())
                _hash_tensor(h, self.z[n])
            self._memo.update(version=version, digest=h.hexdigest())
        return self._memo["digest"]


@dataclass(frozen=True, eq=False)
class SVFMixture:
    """z'_t = Σ_k alpha[k(, t)] · z_{k,t} for every target t the experts cover."""

    experts: tuple[SVFExpert, ...]
    alpha: torch.Tensor  # (K,) one weight per expert, or (K, M) per expert × matrix
    alpha_targets: tuple[str, ...] | None = None  # names of alpha's M columns when alpha is 2-D

    def __post_init__(self):
        if not self.experts:
            raise ValueError("a mixture needs at least one expert")
        if len({e.parametrization for e in self.experts}) != 1:
            raise ValueError("experts of one mixture must share a parametrization (z is interpolated)")
        names = set(self.experts[0].z)
        if any(set(e.z) != names for e in self.experts[1:]):
            raise ValueError("experts of one mixture must adapt the same matrices")
        K = len(self.experts)
        if self.alpha.dim() == 1 and self.alpha.shape[0] == K and self.alpha_targets is None:
            return
        if self.alpha.dim() == 2 and self.alpha.shape[0] == K and self.alpha_targets is not None:
            if len(self.alpha_targets) != self.alpha.shape[1] or set(self.alpha_targets) != names:
                raise ValueError("alpha_targets must name each adapted matrix once, one per alpha column")
            return
        raise ValueError(f"alpha must be ({K},) or ({K}, M) with alpha_targets; got {tuple(self.alpha.shape)}")

    @property
    def parametrization(self) -> Parametrization:
        return self.experts[0].parametrization

    @property
    def target_names(self) -> list[str]:
        return list(self.experts[0].z)

    def z_for(self, name: str) -> torch.Tensor:
        """z' (k,) of one target, float32+ (differentiable in z and alpha)."""
        zs = torch.stack([e.z[name] for e in self.experts])  # (K, k)
        zs = zs.to(torch.promote_types(zs.dtype, torch.float32))
        a = self.alpha if self.alpha.dim() == 1 else self.alpha[:, self.alpha_targets.index(name)]
        return mix_z(zs, a)

    def scales(self, sigma: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Effective singular values s (k,) per covered target, given σ per target name."""
        out = {}
        for name in self.target_names:
            if name not in sigma:
                raise ValueError(f"expert matrix {name} is not an installed target")
            z = self.z_for(name)
            if z.shape != sigma[name].shape:
                raise ValueError(f"{name}: z has {z.shape[0]} values, the matrix has {sigma[name].shape[0]}")
            out[name] = svf_scale(sigma[name], z.to(sigma[name].device), self.parametrization)
        return out

    def update_hash(self, h) -> None:
        h.update(self.parametrization.encode())
        for e in self.experts:
            h.update(e.digest().encode())
        _hash_tensor(h, self.alpha.to(torch.float64))
        h.update(repr(self.alpha_targets).encode())


@dataclass(frozen=True, eq=False)
class SAPTWeights:
    """A SAPT bundle and one request's attention over its tasks."""

    bundle: SAPTBundle
    attention: torch.Tensor  # (T,), sums to 1; from ``bundle.attention`` on this request's prompt

    def __post_init__(self):
        if self.attention.shape != (self.bundle.num_tasks,):
            raise ValueError(f"attention must be ({self.bundle.num_tasks},), got {tuple(self.attention.shape)}")

    def update_hash(self, h) -> None:
        h.update(repr(self.bundle.version()).encode())
        _hash_tensor(h, self.attention.to(torch.float64))


ExpertWeights = Union[Mapping[SVFExpert, float], Sequence[tuple[SVFExpert, float]]]


@dataclass(frozen=True, eq=False)
class Adaptation:
    """An SVF mixture and/or SAPT weights; ``None`` (not an empty Adaptation) means the base model."""

    svf: SVFMixture | None = None
    sapt: SAPTWeights | None = None
    label: str = ""  # for logs and responses, e.g. "math" or "math:0.5+code:0.5"

    def __post_init__(self):
        if self.svf is None and self.sapt is None:
            raise ValueError("an Adaptation needs SVF experts or SAPT weights; use None for the base model")

    @classmethod
    def expert(cls, expert: SVFExpert) -> "Adaptation":
        return cls.mixture({expert: 1.0}, label=expert.name)

    @classmethod
    def mixture(cls, weights: ExpertWeights, label: str | None = None) -> "Adaptation":
        """``{expert: alpha}`` (or pairs): one α per expert, not normalised (as CEM produces)."""
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        experts = tuple(e for e, _ in pairs)
        alphas = [a if isinstance(a, torch.Tensor) else torch.tensor(float(a)) for _, a in pairs]
        mix = SVFMixture(experts, torch.stack(alphas).reshape(len(pairs)))
        if label is None:
            label = "+".join(f"{e.name}:{float(a):g}" for e, a in zip(experts, mix.alpha.detach()))
        return cls(svf=mix, label=label)

    @classmethod
    def per_matrix_mixture(
        cls, experts: Sequence[SVFExpert], alpha: torch.Tensor, targets: Sequence[str], label: str = ""
    ) -> "Adaptation":
        """α per expert × matrix: alpha (K, M), column j for matrix ``targets[j]``."""
        return cls(svf=SVFMixture(tuple(experts), alpha, tuple(targets)), label=label)

    @classmethod
    def sapt_weights(cls, bundle: SAPTBundle, attention: torch.Tensor, label: str = "sapt") -> "Adaptation":
        return cls(sapt=SAPTWeights(bundle, attention), label=label)

    @property
    def requires_grad(self) -> bool:
        """True while training: such adaptations are recomputed every plan, never cached."""
        svf = self.svf is not None and (self.svf.alpha.requires_grad or any(e.requires_grad for e in self.svf.experts))
        sapt = self.sapt is not None and (
            self.sapt.attention.requires_grad or any(p.requires_grad for p in self.sapt.bundle.parameters())
        )
        return svf or sapt

    @property
    def key(self) -> str:
        """Content hash: equal experts/weights give equal keys across requests."""
        h = hashlib.sha256()
        for part in (self.svf, self.sapt):
            h.update(b"|" if part is None else type(part).__name__.encode())
            if part is not None:
                part.update_hash(h)
        return h.hexdigest()[:32]
