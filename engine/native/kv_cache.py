"""Slot KV cache: every running sequence owns one slot (a row of preallocated K/V buffers) for its
whole life. A step writes only the new tokens' keys/values; attention reads a view of the buffers,
so no sequence's cache is copied per step. Running sequences occupy slots 0..n-1; when one leaves, the
last one's cache is moved into the hole once (see ``move``), which keeps every batch a contiguous view.

The object is handed to Hugging Face model code as ``past_key_values``: attention layers call
``update(k, v, layer_idx)`` and attend over what it returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    """Where this forward's tokens go in the cache."""

    slot0: int  # the batch's rows are slots slot0 .. slot0+B-1
    rows: torch.Tensor  # (B, 1) int64: row index within the batch, for scatter
    pos: torch.Tensor  # (B, q) int64: cache position of every query token
    kv_len: int  # attention reads positions [0, kv_len) of each row


class SlotKVCache:
    is_compileable = False  # read by transformers' mask helpers

    def __init__(self, num_layers: int, max_slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, initial_len: int = 256):
        self.num_layers, self.max_slots, self.max_len = num_layers, max_slots, max_len
        self._shape = (num_layers, max_slots, kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.k = self.v = None
        self._ensure(min(initial_len, max_len))
        self.layout: StepLayout | None = None

    # --- capacity ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _ensure(self, needed: int) -> None:
        """Grow the position dimension to hold `needed` tokens (doubling, so growth copies are rare)."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"sequence length {needed} exceeds max_model_len {self.max_len}")
        cap = min(self.max_len, max(needed, 2 * self.capacity, 64))
        cap = min(self.max_len, (cap + 63) // 64 * 64)
        L, S, H, _, D = self._shape
        k = torch.zeros(L, S, H, cap, D, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if self.capacity:
            k[..., : self.capacity, :] = self.k
            v[..., : self.capacity, :] = self.v
        self.k, self.v, self.capacity = k, v, cap

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # --- per-step layout --------------------------------------------------------------------------
    def begin_step(self, slot0: int, starts: torch.Tensor, q_len: int, kv_len: int) -> StepLayout:
        """Prepare a forward of B rows (slots slot0..slot0+B-1), row b writing q_len tokens from starts[b].

        kv_len (= max(starts) + q_len) comes from the host so that no device value is read back here.
        """
        B = starts.shape[0]
        assert slot0 + B <= self.max_slots
        pos = starts[:, None] + torch.arange(q_len, device=starts.device)[None, :]  # (B, q)
        self._ensure(kv_len)
        rows = torch.arange(B, device=starts.device)[:, None]
        self.layout = StepLayout(slot0, rows, pos, kv_len)
        return self.layout

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value: (B, H, q, D) for this step's tokens -> (B, H, kv_len, D) views to attend over."""
        lay = self.layout
        B = key.shape[0]
        kb = self.k[layer_idx, lay.slot0 : lay.slot0 + B]  # (B, H, cap, D) view
        vb = self.v[layer_idx, lay.slot0 : lay.slot0 + B]
        # Advanced indices (rows, pos) around a full slice put their dims first: target is (B, q, H, D).
        kb[lay.rows, :, lay.pos] = key.transpose(1, 2).to(self.dtype)
        vb[lay.rows, :, lay.pos] = value.transpose(1, 2).to(self.dtype)
        return kb[:, :, : lay.kv_len], vb[:, :, : lay.kv_len]

    @torch.inference_mode()  # the buffers are inference tensors: touch them only in inference mode
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction when a sequence leaves)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    @torch.inference_mode()
    def read_prefix(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of slot `slot`'s first `length` positions: (layers, kv_heads, length, head_dim) each."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    @torch.inference_mode()
    def write_prefix(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._ensure(k.shape[2])
        self.k[:, slot, :, : k.shape[2]] = k
        self.v[:, slot, :, : v.shape[2]] = v

    # --- what transformers may ask of a cache ------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.layout is None else int(self.layout.pos[:, 0].max())

    def __len__(self) -> int:
        return self.num_layers
