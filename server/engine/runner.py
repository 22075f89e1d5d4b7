"""Runs prefill and decode forwards of a Hugging Face causal LM over the slot KV cache.

The decoder body gets a 4-D boolean mask built here (so transformers uses it as is), explicit position
ids and the slot cache as `past_key_values`; only each row's last valid hidden state goes through the
LM head. Every forward carries the adaptation table of its rows.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from adapters import AdaptationRuntime
from server.engine.kv_cache import SlotKVCache


def causal_slot_mask(pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """pos: (B, q) cache position of each query token -> (B, 1, q, kv_len) bool, True = may attend.

    A token sees every cached position up to its own; positions past it in the row (stale cache from a
    previous occupant of the slot, or prefill padding) stay hidden.
    """
    j = torch.arange(kv_len, device=pos.device)
    return (j[None, None, :] <= pos[:, :, None])[:, None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, adapt: AdaptationRuntime | None = None):
        self.model = model
        self.body = model.base_model  # decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.cache = cache
        self.adapt = adapt or AdaptationRuntime(model)
        self.device = next(model.parameters()).device
        self._plans: OrderedDict[tuple, tuple[list, object]] = OrderedDict()

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
    def forward(self, slot0: int, input_ids: torch.Tensor, starts: torch.Tensor, last_idx: torch.Tensor,
                adaptations: list, return_hidden: bool = False):
        """One forward over rows in slots slot0..slot0+B-1.

        input_ids: (B, q) new tokens (right-padded); starts: (B,) cache position of each row's first new
        token; last_idx: (B,) index in q of each row's last real token -> logits (B, V) float32.
        """
        B, q = input_ids.shape
        layout = self.cache.begin_step(slot0, starts, q)
        mask = causal_slot_mask(layout.pos, layout.kv_len)
        with self.adapt.activate(self._table(adaptations)):
            hidden = self.body(
                input_ids=input_ids, attention_mask=mask, position_ids=layout.pos,
                past_key_values=self.cache, use_cache=True,
            ).last_hidden_state  # (B, q, d)
        last = hidden[torch.arange(B, device=hidden.device), last_idx]  # (B, d)
        logits = self.lm_head(last).float()
        return (logits, hidden) if return_hidden else logits

    @torch.inference_mode()
    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden: (n, d) states that predict `targets` (n,) -> log p(target) (n,) float32."""
        return self.lm_head(hidden).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
