"""Training LoRA blocks of a SAPT bundle through the serving path: every forward runs inside the
adaptation runtime's step table, with one ``Adaptation.sapt_weights`` per row, so the blocks are trained
exactly as the engine applies them (rank-T·r LoRA, per-row attention, alpha/r folded into B).

``lora_loss`` is the next-token loss of a batch; ``train_steps`` is the loop (Adam, per-step records).
The same code trains a SAPT task (routed attention), a plain LoRA (a one-task bundle at weight 1: SeqLoRA
and the per-task baseline) and ARM's pseudo-input generators.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from adapters import Adaptation, SAPTBundle
from experts.train.objective import next_token_loss, pack, scored_logprobs


def row_adaptations(bundle: SAPTBundle, attention: torch.Tensor | None, rows: int) -> list[Adaptation]:
    """One adaptation per row; ``attention`` (B, T) per row, or None: weight 1 on a one-task bundle
    (one shared object, so the runtime plans it once)."""
    if attention is None:
        one = Adaptation.sapt_weights(bundle, torch.ones(1), label="lora")
        return [one] * rows
    return [Adaptation.sapt_weights(bundle, attention[i]) for i in range(rows)]


def lora_loss(base, bundle: SAPTBundle, prompts: Sequence[list[int]], replies: Sequence[list[int]],
              attention: torch.Tensor | None, total_tokens: int) -> torch.Tensor:
    """Σ −log p(reply tokens) / total_tokens for these rows (a micro-batch's share of the batch loss)."""
    batch = pack(prompts, replies, base.tokenizer.pad_token_id or 0, base.device)
    rt = base.runtime
    with rt.activate(rt.plan(row_adaptations(bundle, attention, batch.rows))):
        logp, _, _ = scored_logprobs(base.model, batch)
    return next_token_loss(logp, total_tokens)


def adam(groups: list[tuple[list[torch.nn.Parameter], float]]) -> torch.optim.Adam:
    return torch.optim.Adam([{"params": ps, "lr": lr} for ps, lr in groups if ps])


def train_steps(base, bundle: SAPTBundle, opt: torch.optim.Optimizer, steps: int, batch_size: int, micro_batch: int,
                next_batch: Callable[[int], tuple[list[list[int]], list[list[int]]]],
                attention: Callable[[list[list[int]]], torch.Tensor] | None,
                extra_loss: Callable[[int], tuple[torch.Tensor, dict]] | None = None,
                on_step: Callable[[dict], None] | None = None,
                after_step: Callable[[], None] | None = None) -> None:
    """``steps`` Adam steps.  ``next_batch(step)`` -> (prompts, replies); ``attention(prompts)`` -> (B, T)
    differentiable weights (None: weight 1 on a one-task bundle); ``extra_loss(step)`` -> (loss, fields)
    added once per step (ARM); ``on_step(record)`` receives loss and timing of each step; ``after_step()``
    runs after each optimizer step (constraints on the parameters)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(steps):
        t0 = time.perf_counter()
        prompts, replies = next_batch(step)
        total = sum(len(r) for r in replies)
        opt.zero_grad(set_to_none=True)
        lm = 0.0
        for s in range(0, len(prompts), micro_batch):
            p, r = prompts[s:s + micro_batch], replies[s:s + micro_batch]
            loss = lora_loss(base, bundle, p, r, attention(p) if attention else None, total)
            loss.backward()
            lm += float(loss.detach())
        record = {"loss": lm}
        if extra_loss is not None:
            extra, fields = extra_loss(step)
            extra.backward()
            record.update(fields)
        grad = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        if after_step is not None:
            after_step()
        record.update(step=step + 1, grad_norm=float(grad), step_s=round(time.perf_counter() - t0, 3), rows=len(prompts))
        if on_step is not None:
            on_step(record)
