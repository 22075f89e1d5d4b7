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
        # One table (rows, K + R): SVF scales, then SAPT bank scales; every row starts as the base model.
        self.scale = torch.zeros(self.rows, self.width + self.sapt_rank, device=dev)
        self.svf = self.scale[:, :self.width]  # views, written in place
        self.sapt = self.scale[:, self.width:]
        self.svf.copy_(self.sigma_row.expand(self.rows, -1))
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
    def svf_rows(self, digests: tuple[str, ...], alpha: torch.Tensor, targets: tuple[str, ...] | None) -> torch.Tensor:
        """s (N, K) of N SVF recipes over the same experts: alpha (N, E) or, one α per expert and matrix,
        (N, E, M) over ``targets`` (M names). z′ = Σ α z over the experts' covered columns; the others keep σ."""
        experts = [self.experts[d] for d in digests]  # KeyError: the front end did not register it
        Z = torch.stack([e.z for e in experts])  # (E, K)
        if alpha.dim() == 3:  # expand each matrix's α over its columns
            cols = torch.zeros(self.width, dtype=torch.long)
            for m, name in enumerate(targets):
                lo, hi = self.offsets[name]
                cols[lo:hi] = m
            z = (alpha[:, :, cols.to(self.device, non_blocking=True)] * Z).sum(1)
        else:
            z = alpha @ Z
        p = experts[0].parametrization
        neutral = 0.0 if p == "sakana" else 1.0
        z = torch.where(experts[0].covered, z, torch.full_like(z, neutral))
        return svf_scale_segments(self.sigma_row.expand_as(z), z, self.segments, len(self.offsets), p)

    def admit(self, row: int, recipe: dict | None) -> None:
        """Write request slot ``row`` for a request with ``recipe`` (None: the base model)."""
        self.admit_many([row], [recipe])

    def admit_many(self, slots: list[int], recipes: list[dict | None]) -> None:
        """Write the slots of the requests a step admits, a few batched writes for all of them: one per group
        of requests mixing the same experts, one per SAPT bundle. A recipe naming an expert or bundle that is
        not registered raises KeyError before any slot is written."""
        svf_groups: dict[tuple, list[tuple[int, list]]] = {}
        sapt_groups: dict[str, list[tuple[int, list]]] = {}
        base: list[int] = []
        for slot, recipe in zip(slots, recipes):
            svf = (recipe or {}).get("svf")
            sapt = (recipe or {}).get("sapt")
            if svf is not None and self.width:
                for d in svf["experts"]:
                    self.experts[d]  # noqa: B018 - KeyError now, not halfway through the writes
                targets = tuple(svf["targets"]) if svf.get("targets") else None
                svf_groups.setdefault((tuple(svf["experts"]), targets), []).append((slot, svf["alpha"]))
            else:
                base.append(slot)
            if sapt is not None:
                if not self.sapt_rank:
                    raise ValueError("this engine has no SAPT bank (rank 0)")
                self.bundles[sapt["bundle"]]  # noqa: B018
                sapt_groups.setdefault(sapt["bundle"], []).append((slot, sapt["attention"]))
        if base and self.width:
            idx = self._device(np.asarray(base, dtype=np.int64), torch.long)
            self.svf.index_copy_(0, idx, self.sigma_row.expand(len(base), -1))
        for (digests, targets), items in svf_groups.items():
            alpha = self._device(np.asarray([a for _, a in items], dtype=np.float32))
            idx = self._device(np.asarray([s for s, _ in items], dtype=np.int64), torch.long)
            self.svf.index_copy_(0, idx, self.svf_rows(digests, alpha, targets))
        if self.sapt_rank:
            idx = self._device(np.asarray(list(slots), dtype=np.int64), torch.long)
            self.sapt.index_fill_(0, idx, 0.0)
            for key, items in sapt_groups.items():
                place = self.bundles[key]
                attn = self._device(np.asarray([a for _, a in items], dtype=np.float32))  # (N, T)
                scale = attn.repeat_interleave(place.rank, dim=1)
                rows = self._device(np.asarray([s for s, _ in items], dtype=np.int64), torch.long)
                self.sapt[:, place.offset:place.offset + scale.shape[1]].index_copy_(0, rows, scale)
        self.admitted += len(slots)

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
        return self._host(np.asarray(values, dtype=np.float32 if dtype == torch.float32 else np.int64)).to(
            self.device, non_blocking=True)

    def memory_bytes(self) -> int:
        tensors = [self.scale, self.token_rows, self.sigma_row, self.segments]
        tensors += [t for e in self.experts.values() for t in (e.z, e.covered)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Piece:
    """One Hugging Face matrix of a (fused) layer, in output order."""

    name: str
    width: int  # this rank's output features of it
    svf: bool = False  # served by its factors (W dropped)
    sapt: bool = False  # has a slice of the SAPT bank
    cols: tuple[int, int] = (0, 0)  # its columns of the layer's h = x Dᵀ (Vᵀ, then its bank's A)


class RowLinear:
    """The quant method of an adapted vLLM linear layer: its ``apply`` computes the module docstring's y.

    Every matrix's terms are one GEMM, concatenated along the inner dimension:

        h = (x Dᵀ) ⊙ table[row, cols]                D: the layer's Vᵀ and A blocks, stacked
        y_j = [x | h_j] [W_j | B_j]ᵀ   or   h_j [U_j | B_j]ᵀ

    so the SAPT term costs no GEMM, no addition and no pass over y of its own. A layer without SVF
    matrices keeps one GEMM for all of them: [x | h] [W | blockdiag(B)]ᵀ. Tensors live on the layer as
    buffers (``t2_*``), so vLLM's compiler sees them as the layer's own; the table is shared by every layer.
    """

    def __init__(self, pieces: list[Piece], merged: bool, bank: int):
        self.pieces = pieces
        self.merged = merged  # no SVF matrix: one GEMM over [x | h] for the whole layer
        self.bank = bank  # SAPT bank width of each adapted matrix (0: none)
        self.down = bool(pieces) and pieces[-1].cols[1] > 0

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = None
        if self.down:
            rows = layer.t2_token_rows[: x.shape[0]]
            # The layer's table columns come from a buffer, not from constants: every layer then traces to the
            # same graph, which vLLM's compiler compiles once for all of them.
            h = (F.linear(x, layer.t2_down) * layer.t2_scale[rows[:, None], layer.t2_cols]).to(x.dtype)
        if self.merged:
            out = F.linear(x if h is None else torch.cat([x, h], dim=-1), layer.t2_up)
        else:
            parts = []
            for j, p in enumerate(self.pieces):
                hj = h[:, p.cols[0]:p.cols[1]] if p.cols[1] > p.cols[0] else None
                inp = hj if p.svf else (x if hj is None else torch.cat([x, hj], dim=-1))
                parts.append(F.linear(inp, getattr(layer, f"t2_up{j}")))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out if bias is None else out + bias

    def bank_slices(self, layer: torch.nn.Module, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A rows of the bank in D (bank, in), B columns of the bank (out_j, bank)) of piece j: views."""
        p = self.pieces[j]
        a = layer.t2_down[p.cols[1] - self.bank:p.cols[1]]
        if self.merged:
            start = sum(q.width for q in self.pieces[:j])
            in_features = layer.t2_up.shape[1] - self.pieces[-1].cols[1]
            b = layer.t2_up[start:start + p.width, in_features + p.cols[0]:in_features + p.cols[1]]
        else:
            up = getattr(layer, f"t2_up{j}")
            b = up[:, up.shape[1] - self.bank:]
        return a, b


def adapt_layer(layer: torch.nn.Module, tables: RowTables, pieces: list[tuple[str, torch.Tensor]],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]], sapt: set[str]) -> RowLinear:
    """Turn ``layer`` into a row-adapted layer.

    pieces: (name, this rank's W_j (out_j, in)) in output order; factors: name -> (U_j, Vh_j) as this
    rank uses them (SVF matrices; the others keep W_j); sapt: the pieces that get a slice of the SAPT bank
    (all zero until a bundle is written). The layer's own weight is then released."""
    dev, dtype = pieces[0][1].device, pieces[0][1].dtype
    in_features = pieces[0][1].shape[1]
    R = tables.sapt_rank
    out_pieces: list[Piece] = []
    downs, cols, col = [], [], 0
    for name, w in pieces:
        piece = Piece(name, w.shape[0], svf=name in factors, sapt=bool(R) and name in sapt)
        start = col
        if piece.svf:
            Vh = factors[name][1]
            lo, hi = tables.offsets[name]
            downs.append(Vh.to(dev, dtype))
            cols.append(torch.arange(lo, hi))
            col += hi - lo
        if piece.sapt:
            downs.append(torch.zeros(R, in_features, device=dev, dtype=dtype))
            cols.append(tables.width + torch.arange(R))
            col += R
        piece.cols = (start, col)
        out_pieces.append(piece)
    merged = not any(p.svf for p in out_pieces)
    bank = R if any(p.sapt for p in out_pieces) else 0
    if downs:
        layer.register_buffer("t2_down", torch.cat(downs).contiguous(), persistent=False)
        layer.register_buffer("t2_cols", torch.cat(cols).to(dev), persistent=False)
    if merged:  # [W | blockdiag(B)]: one GEMM for the whole layer
        up = torch.zeros(sum(p.width for p in out_pieces), in_features + col, device=dev, dtype=dtype)
        up[:, :in_features] = torch.cat([w for _, w in pieces])
        layer.register_buffer("t2_up", up, persistent=False)
    else:
        for j, ((name, w), p) in enumerate(zip(pieces, out_pieces)):
            blocks = [factors[name][0].to(dev, dtype)] if p.svf else [w]
            if p.sapt:
                blocks.append(torch.zeros(p.width, R, device=dev, dtype=dtype))
            layer.register_buffer(f"t2_up{j}", torch.cat(blocks, dim=1).contiguous(), persistent=False)
    layer.register_buffer("t2_scale", tables.scale, persistent=False)
    layer.register_buffer("t2_token_rows", tables.token_rows, persistent=False)
    method = RowLinear(out_pieces, merged, bank)
    layer.t2_base_method = getattr(layer, "quant_method", None)
    layer.quant_method = method
    # W is served by the buffers above now: release the parameter's memory (the attribute stays, empty).
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.nn.Parameter):
        weight.data = torch.empty(0, device=dev, dtype=dtype)
    return method


def layer_bytes(layer: torch.nn.Module, method: RowLinear) -> dict[str, int]:
    """GPU bytes of ``layer``'s adapted form: ``factors`` (U and Vᵀ of its SVF matrices), ``bank`` (its
    SAPT A and B slices) and ``weights`` (the W it keeps)."""
    size = layer.t2_down.element_size() if method.down else 0
    out = {"factors": 0, "bank": 0, "weights": 0}
    for j, p in enumerate(method.pieces):
        k = p.cols[1] - p.cols[0] - (method.bank if p.sapt else 0)
        if p.sapt:
            out["bank"] += method.bank * (layer.t2_down.shape[1] + p.width) * size
        if p.svf:
            out["factors"] += k * (layer.t2_down.shape[1] + p.width) * size
        else:
            w = layer.t2_up if method.merged else getattr(layer, f"t2_up{j}")
            in_features = w.shape[1] - (method.pieces[-1].cols[1] if method.merged else (method.bank if p.sapt else 0))
            out["weights"] += p.width * in_features * w.element_size()
    return out


def write_bank(layer: torch.nn.Module, method: RowLinear, name: str, place: Placement,
               A: torch.Tensor | None, B: torch.Tensor | None) -> None:
    """Put bundle columns [place.offset, +width) of matrix ``name`` into ``layer``'s bank (A: (width, in)
    as this rank uses it, B: (out_j, width)); None clears them."""
    for j, p in enumerate(method.pieces):
        if p.name != name or not p.sapt:
            continue
        bank_a, bank_b = method.bank_slices(layer, j)
        cols = slice(place.offset, place.offset + place.width)
        if A is None:
            bank_a[cols].zero_()
            bank_b[:, cols].zero_()
        else:
            bank_a[cols].copy_(A)
            bank_b[:, cols].copy_(B)
        return
    raise KeyError(f"{name} has no SAPT bank in this layer")
