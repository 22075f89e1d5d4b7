"""SAPT (shared attentive PET blocks): per-task LoRA / soft-prompt blocks mixed by a per-request
attention vector (REFERENCE.md §2).

Routing: q = QueryProjection(maxpool_tokens(frozen input embeddings of the prompt)), with padding
masked out of the max so a request's weights never depend on its batch; a = softmax_t(k_t·q / √d).

Mixing: Σ_t a_t · s · B_t A_t (s = alpha / r) is one LoRA of rank T·r,
    A = [A_1; …; A_T] (T·r × in),  B = s·[B_1 … B_T] (out × T·r),  per-row scale a[row] ⊗ 1_r,
so a batch whose rows carry different attention vectors is still two thin GEMMs per target layer.
Soft prompts (P × d per task) are mixed by the same weights.

The tensor math is in pure functions; ``SAPTBundle`` only holds the learnable tensors of all tasks
(one ``SAPTTask`` each, so continual learning can freeze older tasks by ``requires_grad_(False)``).
"""
from __future__ import annotations

import math
import uuid
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

QUERY_HIDDEN = 100  # h of the reference query projection


# --- pure functions ------------------------------------------------------------------------------

def pool_query(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the prompt's tokens, padding excluded.  embeds: (B, L, d), mask: (B, L) bool/0-1
    -> (B, d).  Padding is set to −inf before the max, so left/right padding changes nothing."""
    mask = mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one prompt token to compute its SAPT query")
    return embeds.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)


def attention_weights(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """a = softmax_t(k_t·q / √d).  keys: (T, d), query: (B, d) -> (B, T)."""
    return torch.softmax(query @ keys.t() / math.sqrt(keys.shape[-1]), dim=-1)


def init_lora(out_features: int, in_features: int, rank: int, dtype=torch.float32):
    """One LoRA block as in the reference code: A kaiming-uniform (a = √5, like nn.Linear), B zeros
    (so a new block starts as a no-op).  -> A (r, in), B (out, r)."""
    A = torch.empty(rank, in_features, dtype=dtype)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, torch.zeros(out_features, rank, dtype=dtype)


def stack_lora(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scaling: float):
    """T blocks as one rank-T·r LoRA.  As: T × (r, in), Bs: T × (out, r)
    -> A_cat (T·r, in), B_cat (out, T·r) with the LoRA scaling s = alpha / r folded into B."""
    return torch.cat(list(As), dim=0), torch.cat(list(Bs), dim=1) * scaling


def row_lora_scale(attn: torch.Tensor, rank: int) -> torch.Tensor:
    """a ⊗ 1_r per row.  attn: (B, T) -> (B, T·r): each task's weight repeated over its r ranks."""
    return attn.repeat_interleave(rank, dim=-1)


def lora_delta(x: torch.Tensor, A_cat: torch.Tensor, B_cat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """((x Aᵀ) ⊙ scale[row]) Bᵀ.  x: (B, L, in), A_cat: (R, in), B_cat: (out, R),
    scale: (B, 1, R) -> (B, L, out)."""
    return F.linear(F.linear(x, A_cat) * scale, B_cat)


def mix_soft_prompts(prompts: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Σ_t a_t P_t.  prompts: (T, P, d), attn: (B, T) -> (B, P, d) prefix embeddings per row."""
    return torch.einsum("bt,tpd->bpd", attn.to(prompts.dtype), prompts)


# --- learnable tensors ---------------------------------------------------------------------------

class QueryProjection(nn.Module):
    """Linear(d→h, no bias) → Linear(h→d, no bias) → SiLU → LayerNorm(d)."""

    def __init__(self, d_model: int, hidden: int = QUERY_HIDDEN):
        super().__init__()
        self.down = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(hidden, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return self.norm(F.silu(self.up(self.down(q))))


class SAPTTask(nn.Module):
    """One task's PET block: a LoRA per target, a key, and an optional soft prompt."""

    def __init__(self, shapes: Sequence[tuple[int, int]], d_model: int, rank: int, prompt_len: int):
        super().__init__()
        blocks = [init_lora(out_f, in_f, rank) for out_f, in_f in shapes]
        self.A = nn.ParameterList([nn.Parameter(a) for a, _ in blocks])  # per target (r, in)
        self.B = nn.ParameterList([nn.Parameter(b) for _, b in blocks])  # per target (out, r)
        self.key = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))  # (d,)
        self.prompt = nn.Parameter(torch.randn(prompt_len, d_model) * 0.02) if prompt_len else None


class SAPTBundle(nn.Module):
    """All tasks of one SAPT run plus the shared query projection.

    ``targets`` maps target module name -> (out, in) (e.g. ``{t.name: (t.out_features,
    t.in_features) for t in runtime.targets if t.name.endswith(("q_proj", "v_proj"))}``).
    ``bundle_id`` names these weights in adaptation keys; give a new id when the weights change
    outside autograd's in-place counters (e.g. loading other weights).
    """

    def __init__(
        self,
        targets: Mapping[str, tuple[int, int]],
        d_model: int,
        num_tasks: int = 0,
        rank: int = 8,
        alpha: float = 32.0,
        prompt_len: int = 0,
        hidden: int = QUERY_HIDDEN,
        bundle_id: str | None = None,
    ):
        super().__init__()
        self.target_names = list(targets)
        self.shapes = [tuple(targets[n]) for n in self.target_names]
        self.d_model, self.rank, self.alpha, self.prompt_len = d_model, rank, float(alpha), prompt_len
        self.bundle_id = bundle_id or uuid.uuid4().hex
        self.query_proj = QueryProjection(d_model, hidden)
        self.tasks = nn.ModuleList()
        self._stack_cache: tuple[tuple, dict] | None = None
        for _ in range(num_tasks):
            self.add_task()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def add_task(self) -> SAPTTask:
        """Append a new task block (LoRA B = 0, so the mixture is unchanged until it trains)."""
        self.__dict__.pop("_frozen", None)  # it is trained again
        p = next(self.parameters())
        task = SAPTTask(self.shapes, self.d_model, self.rank, self.prompt_len).to(p.device, p.dtype)
        self.tasks.append(task)
        return task

    def keys(self) -> torch.Tensor:  # (T, d)
        return torch.stack([t.key for t in self.tasks])

    def attention(self, input_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-request mixture weights.  input_embeds: (B, L, d) frozen token embeddings of the
        prompts, mask: (B, L) 1 = prompt token -> (B, T)."""
        q = self.query_proj(pool_query(input_embeds.to(self.keys().dtype), mask))
        return attention_weights(self.keys(), q)

    def mixed_prompts(self, attn: torch.Tensor) -> torch.Tensor:
        """Soft-prompt prefix per row.  attn: (B, T) -> (B, P, d)."""
        if not self.prompt_len:
            raise ValueError("this bundle has no soft prompts")
        return mix_soft_prompts(torch.stack([t.prompt for t in self.tasks]), attn)

    def freeze(self) -> "SAPTBundle":
        """Mark these weights final (as served): gradients off, and ``version`` stops re-reading the
        parameters' in-place counters (~0.1 ms per call at 8B, paid per request otherwise). A task added
        later unfreezes the bundle."""
        self.requires_grad_(False)
        self.__dict__.pop("_frozen", None)
        self.__dict__["_frozen"] = self.version()
        return self

    def version(self) -> tuple:
        """Changes whenever a parameter is updated in place (optimizer step) or a task is added."""
        frozen = self.__dict__.get("_frozen")
        if frozen is not None:
            return frozen
        params = self.__dict__.get("_param_list")
        if params is None or params[0] != self.num_tasks:  # the module walk costs ~1 ms at 8B: done once per task
            params = self.__dict__["_param_list"] = (self.num_tasks, list(self.parameters()))
        return (self.bundle_id, self.num_tasks, sum(p._version for p in params[1]))

    def stacked_lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A_cat (T·r, in), B_cat (out, T·r)), cached until the weights change; rebuilt
        (and differentiable) while gradients are being recorded for any of its parameters."""
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not training and self._stack_cache is not None and self._stack_cache[0] == self.version():
            return self._stack_cache[1]
        out = {
            name: stack_lora([t.A[i] for t in self.tasks], [t.B[i] for t in self.tasks], self.scaling)
            for i, name in enumerate(self.target_names)
        }
        if not training:
            out = {n: (a.detach(), b.detach()) for n, (a, b) in out.items()}
            self._stack_cache = (self.version(), out)
        return out
