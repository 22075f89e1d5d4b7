"""Runs prefill and decode forwards of a Hugging Face causal LM over the slot KV cache.

The decoder body gets a 4-D boolean mask built here (so transformers uses it as is), explicit position
ids and the slot cache as `past_key_values`; only each row's last valid hidden state goes through the
LM head. Every forward carries the adaptation table of its rows.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import torch

from adapters import AdaptationRuntime
from engine.native.kv_cache import SlotKVCache

# This runner hands its slot cache to Hugging Face's forward as `past_key_values`, which transformers deprecates
# (removed in 5.40: pyproject.toml pins below it). Every forward repeated the notice into the server's log.
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)


def causal_slot_mask(pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """pos: (B, q) cache position of each query token -> (B, 1, q, kv_len) bool, True = may attend.

    A token sees every cached position up to its own; positions past it in the row (stale cache from a
    previous occupant of the slot, or prefill padding) stay hidden.
    """
    j = torch.arange(kv_len, device=pos.device)
    return (j[None, None, :] <= pos[:, :, None])[:, None]


def attention_backends(device: torch.device):
    """On CUDA, SDPA without the cuDNN backend: with a mask and a key length that grows every step, cuDNN
    builds a new execution plan per call (about 2 ms of host time each, measured on an H100), while the
    memory-efficient kernel launches at once. Elsewhere, SDPA's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, adapt: AdaptationRuntime | None = None):
        self.model = model
        self.body = model.base_model  # decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.cache = cache
        self.adapt = adapt or AdaptationRuntime(model)
        self.device = next(model.parameters()).device
        self._plans: OrderedDict[tuple, tuple[list, object]] = OrderedDict()

    def invalidate(self) -> None:
        """Forget the cached step tables (the adaptive layers changed)."""
        self._plans.clear()

    def _table(self, adaptations: list):
        """Adaptation table for these rows, rebuilt only when the rows' adaptations change.

        A step alternates between a prefill batch and the decode batch, so a few recent plans are kept.
        Entries hold their adaptations, so an id can never be reused by another object while cached.
        """
        if all(a is None for a in adaptations):
            return None
        key = tuple(id(a) for a in adaptations)
        hit = self._plans.get(key)
        if hit is None:
            hit = (list(adaptations), self.adapt.plan(adaptations))
            self._plans[key] = hit
            if len(self._plans) > 4:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return hit[1]

    @torch.inference_mode()
    def forward(self, slot0: int, input_ids: torch.Tensor, starts: list[int], last_idx: list[int],
                adaptations: list, return_hidden: bool = False):
        """One forward over rows in slots slot0..slot0+B-1.

        input_ids: (B, q) new tokens on the host (right-padded); starts: cache position of each row's first
        new token; last_idx: index in q of each row's last real token -> logits (B, V) float32 (and the final
        hidden states (B, q, d) with `return_hidden`). Everything the host needs (kv_len) is computed from
        host values: reading a device value back would stall the launch queue every step.
        """
        B, q = input_ids.shape
        dev = self.device
        host = torch.tensor([starts, last_idx], dtype=torch.long)
        if dev.type == "cuda":
            input_ids, host = input_ids.pin_memory(), host.pin_memory()
        input_ids = input_ids.to(dev, non_blocking=True)
        host = host.to(dev, non_blocking=True)
        layout = self.cache.begin_step(slot0, host[0], q, max(starts) + q)
        mask = causal_slot_mask(layout.pos, layout.kv_len)
        with self.adapt.activate(self._table(adaptations)), attention_backends(dev):
            hidden = self.body(
                input_ids=input_ids, attention_mask=mask, position_ids=layout.pos,
                past_key_values=self.cache, use_cache=True,
            ).last_hidden_state  # (B, q, d)
        last = hidden[torch.arange(B, device=dev), host[1]]  # (B, d)
        logits = self.lm_head(last).float()
        return (logits, hidden) if return_hidden else logits

    @torch.inference_mode()
    def prompt_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, k: int, chunk: int = 256):
        """hidden: (n, d) states that predict ``targets`` (n,) -> (log p(target) (n,), top-k values (n, k),
        top-k ids (n, k)), float32, in chunks of ``chunk`` positions (a prompt's (n, V) at once is large)."""
        lps, vals, ids = [], [], []
        for a in range(0, hidden.shape[0], chunk):
            logp = self.lm_head(hidden[a:a + chunk]).float().log_softmax(-1)
            lps.append(logp.gather(1, targets[a:a + chunk, None]).squeeze(1))
            top = logp.topk(k, dim=-1) if k else None
            vals.append(top.values if k else logp[:, :0])
            ids.append(top.indices if k else logp[:, :0].long())
        return torch.cat(lps), torch.cat(vals), torch.cat(ids)

    @torch.inference_mode()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden: (n, d) states that predict `targets` (n,) -> log p(target) (n,) float32."""
        return self.lm_head(hidden).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
