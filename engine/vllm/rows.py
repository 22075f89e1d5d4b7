"""Every request its own exact adaptation inside vLLM's model execution: per-row scales in fixed tables.

Each adapted linear layer of the served model computes, for the tokens x of a step (one row per token),

    y_j = [x W_jᵀ  or  ((x V_jᵀ) ⊙ s_svf[row]) U_jᵀ] + ((x A_jᵀ) ⊙ s_sapt[row]) B_jᵀ

per Hugging Face matrix j inside the layer (vLLM fuses gate/up and q/k/v into one layer). SVF matrices
drop W for its thin SVD U diag(σ) Vᵀ: a row's effective singular values s = σ ⊙ m′ (the sakana rescale
folded in) are the SVF adaptation exactly, and the base model is the row s = σ. SAPT's stacked LoRA
blocks (A_j, B_j) of every task of every loaded bundle sit side by side in a bank of fixed rank; a row's
attention weights, each repeated over its task's rank, select and mix them (0 elsewhere: no SAPT).

``RowTables`` holds one row of scales per request slot of vLLM's runner (its request index, so a batch
holds as many distinct adaptations as vLLM runs requests) and the per-token row index of the step being
run. Every tensor here is allocated once, before vLLM captures its CUDA graphs; admitting a request writes
its row, a step writes the token rows, both in place. The row is computed in the worker from a compact
recipe the request carries (expert digests and their α, or the SAPT bundle's place and the attention),
against experts and bundles registered on every worker beforehand.

Torch only (no vLLM import): the vLLM-specific wiring lives in ``engine.vllm.rows_worker``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from adapters.svf import check_parametrization, svf_scale_segments

RECIPE_KEY = "t2_rows"  # the key of SamplingParams.extra_args that carries a request's recipe


@dataclass
class BankExpert:
    """One SVF expert laid out like a table row: z per column, and which columns it covers."""

    z: torch.Tensor  # (K,) float32
    covered: torch.Tensor  # (K,) bool
    parametrization: str


@dataclass
class Placement:
    """Where one SAPT bundle sits in the bank: columns [offset, offset + width), r per task."""

    offset: int
    width: int
    rank: int


def first_fit(taken: list[tuple[int, int]], width: int, capacity: int, at: int | None = None) -> int | None:
    """The first offset where ``width`` columns are free among ``taken`` (offset, width) ranges of a bank
    of ``capacity`` columns (or ``at`` itself when it is free there); None when there is no room."""
    spans = sorted((o, o + w) for o, w in taken)
    starts = [at] if at is not None else [0] + [hi for _, hi in spans]
    for start in starts:
        if start + width <= capacity and all(hi <= start or lo >= start + width for lo, hi in spans):
            return start
    return None


@dataclass
class RowTables:
    """Per-request scale rows and the per-token row index of one worker (see the module docstring)."""

    sigma: dict[str, torch.Tensor]  # SVF matrices in table order -> σ (k,), float32
    sapt_rank: int  # bank width (0: no SAPT)
    rows: int  # request slots (vLLM's max_num_seqs)
    max_tokens: int  # tokens of the largest step, padding included
    device: torch.device | str = "cpu"
    experts: dict[str, BankExpert] = field(default_factory=dict)
    bundles: dict[str, Placement] = field(default_factory=dict)

    def __post_init__(self):
        names = list(self.sigma)
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for n in names:
            k = int(self.sigma[n].shape[0])
            self.offsets[n] = (off, off + k)
            off += k
        self.width = off
        dev = self.device
        self.sigma_row = (torch.cat([self.sigma[n].float() for n in names]) if names
                          else torch.zeros(0)).to(dev)
        self.segments = torch.cat([torch.full((self.offsets[n][1] - self.offsets[n][0],), i, dtype=torch.long)
                                   for i, n in enumerate(names)]).to(dev) if names else torch.zeros(0, dtype=torch.long)
        self.svf = self.sigma_row.repeat(self.rows, 1).contiguous()  # (rows, K): every row the base model
        self.sapt = torch.zeros(self.rows, self.sapt_rank, device=dev)  # (rows, R)
        self.token_rows = torch.zeros(self.max_tokens, dtype=torch.long, device=dev)
        self.admitted = 0  # rows written since start (a figure for tests and stats)

    # --- experts and bundles (registered on every worker before a request names them) ------------------
    def put_expert(self, digest: str, z: dict[str, torch.Tensor], parametrization: str) -> None:
        check_parametrization(parametrization)
        unknown = set(z) - set(self.offsets)
        if unknown:
            raise ValueError(f"expert matrices not adapted here: {sorted(unknown)[:3]}")
        row = torch.zeros(self.width)
        covered = torch.zeros(self.width, dtype=torch.bool)
        for name, v in z.items():
            lo, hi = self.offsets[name]
            if v.shape != (hi - lo,):
                raise ValueError(f"{name}: z has shape {tuple(v.shape)}, the matrix has {hi - lo} singular values")
            row[lo:hi] = v.float()
            covered[lo:hi] = True
        self.experts[digest] = BankExpert(row.to(self.device), covered.to(self.device), parametrization)

    def drop_expert(self, digest: str) -> None:
        self.experts.pop(digest, None)

    def place_bundle(self, key: str, width: int, rank: int, offset: int) -> Placement:
        """Bank columns [offset, offset + width) for bundle ``key`` (the front end chose them with
        ``first_fit``); ValueError when they overlap another bundle or leave the bank."""
        if key in self.bundles:
            return self.bundles[key]
        if first_fit([(p.offset, p.width) for p in self.bundles.values()], width, self.sapt_rank,
                     at=offset) != offset:
            raise ValueError(f"SAPT bank columns [{offset}, {offset + width}) are not free")
        self.bundles[key] = Placement(offset, width, rank)
        return self.bundles[key]

    def drop_bundle(self, key: str) -> Placement | None:
        return self.bundles.pop(key, None)

    # --- rows ---------------------------------------------------------------------------------------------
    def svf_row(self, recipe: dict) -> torch.Tensor:
        """s (K,) of an SVF recipe: {"experts": [digest, ...], "alpha": [K] or [K][M], "targets": [M names] or
        None}. z′ = Σ α z over the experts' covered columns; the others keep σ."""
        experts = [self.experts[d] for d in recipe["experts"]]  # KeyError: the front end did not register it
        alpha = self._device(recipe["alpha"])
        Z = torch.stack([e.z for e in experts])  # (E, K)
        if alpha.dim() == 2:  # one α per expert and matrix: expand each matrix's α over its columns
            cols = torch.zeros(self.width, dtype=torch.long)
            for m, name in enumerate(recipe["targets"]):
                lo, hi = self.offsets[name]
                cols[lo:hi] = m
            alpha = alpha[:, cols.to(self.device, non_blocking=True)]  # (E, K)
            z = (alpha * Z).sum(0)
        else:
            z = alpha @ Z
        p = experts[0].parametrization
        neutral = 0.0 if p == "sakana" else 1.0
        z = torch.where(experts[0].covered, z, torch.full_like(z, neutral))
        return svf_scale_segments(self.sigma_row, z, self.segments, len(self.offsets), p)

    def admit(self, row: int, recipe: dict | None) -> None:
        """Write request slot ``row`` for a request with ``recipe`` (None: the base model)."""
        svf = (recipe or {}).get("svf")
        sapt = (recipe or {}).get("sapt")
        if svf is not None and self.width:
            self.svf[row].copy_(self.svf_row(svf))
        else:
            self.svf[row].copy_(self.sigma_row)
        if self.sapt_rank:
            self.sapt[row].zero_()
            if sapt is not None:
                place = self.bundles[sapt["bundle"]]
                attn = self._device(sapt["attention"])
                scale = attn.repeat_interleave(place.rank)
                self.sapt[row, place.offset:place.offset + scale.shape[0]] = scale
        elif sapt is not None:
            raise ValueError("this engine has no SAPT bank (rank 0)")
        self.admitted += 1

    def map_tokens(self, req_rows: np.ndarray, counts: np.ndarray, padded: int) -> None:
        """The step's token -> row index: request i's ``counts[i]`` tokens read row ``req_rows[i]``;
        tokens past the real ones (CUDA-graph padding) read row 0 (their outputs are discarded)."""
        idx = np.zeros(padded, dtype=np.int64)
        n = int(counts.sum())
        idx[:n] = np.repeat(req_rows.astype(np.int64), counts)
        self.token_rows[:padded].copy_(self._host(idx), non_blocking=True)

    def _host(self, values) -> torch.Tensor:
        """``values`` as a host tensor the device copies from without stopping the host: pinned memory
        (torch's host allocator keeps a pinned block until the copies that read it are done), so vLLM's
        CPU work for the next step overlaps the GPU's work on this one."""
        t = torch.as_tensor(values)
        return t.pin_memory() if self.token_rows.is_cuda else t

    def _device(self, values, dtype=torch.float32) -> torch.Tensor:
        return self._host(np.asarray(values, dtype=np.float32) if dtype == torch.float32 else values).to(
            self.device, non_blocking=True)

    def memory_bytes(self) -> int:
        tensors = [self.svf, self.sapt, self.token_rows, self.sigma_row, self.segments]
        tensors += [t for e in self.experts.values() for t in (e.z, e.covered)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Piece:
    """One Hugging Face matrix of a (fused) layer, in output order."""

    name: str
    width: int  # this rank's output features of it
    svf: tuple[int, int] | None = None  # columns of the layer's h = x Vᵀ that are its (None: kept W)
    sapt: tuple[int, int] | None = None  # columns of the layer's g = x Aᵀ that are its


class RowLinear:
    """The quant method of an adapted vLLM linear layer: its ``apply`` computes the module docstring's y.

    Tensors live on the layer as buffers (``t2_*``), so vLLM's compiler sees them as the layer's own;
    the tables are shared by every layer.
    """

    def __init__(self, pieces: list[Piece], svf_cols: tuple[int, int] | None, sapt_cols: int):
        self.pieces = pieces
        self.svf_cols = svf_cols  # this layer's columns of the SVF table
        self.sapt_cols = sapt_cols  # bank width (0: none)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = layer.t2_token_rows[: x.shape[0]]
        h = g = None
        if self.svf_cols is not None:
            # The layer's table columns come from a buffer, not from constants: every layer then traces to the
            # same graph, which vLLM's compiler compiles once for all of them.
            h = (F.linear(x, layer.t2_vh) * layer.t2_svf[rows[:, None], layer.t2_cols]).to(x.dtype)
        if self.sapt_cols:
            g = F.linear(x, layer.t2_sapt_a)  # (n, pieces × R)
            scale = layer.t2_sapt[rows]
            g = (g.view(g.shape[0], -1, self.sapt_cols) * scale[:, None, :]).to(x.dtype).view(g.shape[0], -1)
        parts = []
        for j, p in enumerate(self.pieces):
            if p.svf is not None:
                y = F.linear(h[:, p.svf[0]:p.svf[1]], getattr(layer, f"t2_u{j}"))
            else:
                y = F.linear(x, getattr(layer, f"t2_w{j}"))
            if p.sapt is not None:
                y = y + F.linear(g[:, p.sapt[0]:p.sapt[1]], getattr(layer, f"t2_sapt_b{j}"))
            parts.append(y)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out if bias is None else out + bias


def adapt_layer(layer: torch.nn.Module, tables: RowTables, pieces: list[tuple[str, torch.Tensor]],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]], sapt: set[str]) -> RowLinear:
    """Turn ``layer`` into a row-adapted layer.

    pieces: (name, this rank's W_j (out_j, in)) in output order; factors: name -> (U_j, Vh_j) as this
    rank uses them (SVF matrices; the others keep W_j); sapt: the pieces that get a slice of the SAPT bank. The layer's own weight is then released (the caller still holds nothing of it)."""
    dev, dtype = pieces[0][1].device, pieces[0][1].dtype
    out_pieces: list[Piece] = []
    vhs, col, cols = [], 0, None
    names = [n for n, _ in pieces]
    svf_names = [n for n in names if n in factors]
    if svf_names:
        spans = [tables.offsets[n] for n in svf_names]
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            raise ValueError(f"the SVF matrices of {names} are not consecutive in the table")
        cols = (spans[0][0], spans[-1][1])
    R = tables.sapt_rank
    for j, (name, w) in enumerate(pieces):
        piece = Piece(name, w.shape[0])
        if name in factors:
            U, Vh = factors[name]
            piece.svf = (col, col + Vh.shape[0])
            col += Vh.shape[0]
            vhs.append(Vh)
            layer.register_buffer(f"t2_u{j}", U.to(dev, dtype).contiguous(), persistent=False)
        else:
            layer.register_buffer(f"t2_w{j}", w.contiguous(), persistent=False)
        if R and name in sapt:
            piece.sapt = (j * R, (j + 1) * R)
            layer.register_buffer(f"t2_sapt_b{j}", torch.zeros(w.shape[0], R, device=dev, dtype=dtype),
                                  persistent=False)
        out_pieces.append(piece)
    if vhs:
        layer.register_buffer("t2_vh", torch.cat(vhs).to(dev, dtype).contiguous(), persistent=False)
        layer.register_buffer("t2_cols", torch.arange(cols[0], cols[1], device=dev), persistent=False)
    R = R if any(p.sapt for p in out_pieces) else 0
    if R:
        layer.register_buffer("t2_sapt_a", torch.zeros(len(pieces) * R, pieces[0][1].shape[1], device=dev,
                                                       dtype=dtype), persistent=False)
    layer.register_buffer("t2_svf", tables.svf, persistent=False)
    layer.register_buffer("t2_sapt", tables.sapt, persistent=False)
    layer.register_buffer("t2_token_rows", tables.token_rows, persistent=False)
    method = RowLinear(out_pieces, cols, R)
    layer.t2_base_method = getattr(layer, "quant_method", None)
    layer.quant_method = method
    # W is served by the buffers above now: release the parameter's memory (the attribute stays, empty).
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.nn.Parameter):
        weight.data = torch.empty(0, device=dev, dtype=dtype)
    return method


def write_bank(layer: torch.nn.Module, method: RowLinear, name: str, place: Placement,
               A: torch.Tensor | None, B: torch.Tensor | None) -> None:
    """Put bundle columns [place.offset, +width) of matrix ``name`` into ``layer``'s bank (A: (width, in)
    as this rank uses it, B: (out_j, width)); None clears them."""
    for j, p in enumerate(method.pieces):
        if p.name != name or p.sapt is None:
            continue
        a_rows = slice(p.sapt[0] + place.offset, p.sapt[0] + place.offset + place.width)
        bank_a, bank_b = layer.t2_sapt_a, getattr(layer, f"t2_sapt_b{j}")
        cols = slice(place.offset, place.offset + place.width)
        if A is None:
            bank_a[a_rows].zero_()
            bank_b[:, cols].zero_()
        else:
            bank_a[a_rows].copy_(A)
            bank_b[:, cols].copy_(B)
        return
    raise KeyError(f"{name} has no SAPT bank in this layer")
