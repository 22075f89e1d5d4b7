"""One method learning a task sequence (REFERENCE.md §2), task after task.

- ``sapt``: per task, a new LoRA block and key are added; the block, the key and the shared query
  projection (continued from the previous task) are trained through the attention mixture, with the
  backbone, older blocks and older keys frozen. After the task its mean attention vector on the
  validation prompts is stored, and ARM's generator writes its pseudo-inputs; while later tasks are
  learned, kl_ratio · KL(stored ‖ attention on pseudo-inputs) keeps old tasks routed to their blocks.
- ``sapt_noarm``: the same without ARM.
- ``seqlora``: one LoRA block (a one-task bundle at weight 1) trained on every task in turn.
- ``single``: a fresh LoRA per task (the ã_j of FWT).

Every random choice (block and key init, data order, ARM batches, sampling) is seeded by the run's
seed and the task's place in the sequence, so a method branched from another at a task boundary
(``snapshot``/``from_snapshot``), or resumed from a checkpoint, does what a run from scratch does.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable

import torch

from adapters import SAPTBundle
from experts.sapt.arm import sample_inputs, train_generator
from experts.sapt.blocks import adam, train_steps
from experts.sapt.config import SAPTConfig
from experts.sapt.data import TaskData, TaskPool, derive_seed
from experts.sapt.evaluate import Evaluator
from experts.sapt.routing import arm_kl, pad_to, project_out, prompt_attention, shared_direction
from experts.store.sapt_tensors import bundle_from_tensors, bundle_tensors
from experts.tasks import render_prompt

log = logging.getLogger("t2serve.sapt")


def lora_targets(runtime, patterns: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of the installed targets that get LoRA blocks."""
    found = {t.name: (t.out_features, t.in_features) for t in runtime.targets
             if any(t.name == p or t.name.endswith("." + p) for p in patterns)}
    if not found:
        raise ValueError(f"no installed target matches {patterns}: load the model with these targets installed")
    return found


class SequenceLearner:
    def __init__(self, cfg: SAPTConfig, base, pool: TaskPool, evaluator: Evaluator, *,
                 on_record: Callable[[dict], None] | None = None):
        self.cfg, self.base, self.pool, self.evaluator = cfg, base, pool, evaluator
        self.on_record = on_record or (lambda r: None)
        self.bundle: SAPTBundle | None = None
        self.learned: list[str] = []  # task names, in the order learned
        self.mean_attn: list[torch.Tensor] = []  # per learned task: (its index + 1,) attention stored by ARM
        self.pseudo: list[list[list[int]]] = []  # per learned task: pseudo-input prompts (empty without ARM)
        self.rows: list[dict[str, float]] = []  # per learned task: scores on the evaluated tasks after it
        self.attention: list[dict[str, list[float]] | None] = []  # per learned task: mean attention per test set
        self.global_step = 0
        self.shared_dir: torch.Tensor | None = None  # (d,) the bare template's pooled direction; router layer 1 ⟂ it

    # --- state ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything needed to continue from here (tensors on the CPU, plain lists)."""
        return {"tensors": bundle_tensors(self.bundle) if self.bundle is not None else {},
                "learned": list(self.learned), "mean_attn": [v.tolist() for v in self.mean_attn],
                "pseudo": copy.deepcopy(self.pseudo), "rows": copy.deepcopy(self.rows),
                "attention": copy.deepcopy(self.attention), "global_step": self.global_step,
                "shared_dir": None if self.shared_dir is None else self.shared_dir.tolist()}

    def restore(self, snap: dict) -> "SequenceLearner":
        if snap["tensors"]:
            self.bundle = bundle_from_tensors(snap["tensors"], self.cfg.lora_alpha, bundle_id=f"train-{self.cfg.seed}",
                                              target_order=list(lora_targets(self.base.runtime, self.cfg.target_patterns)))
            self.bundle = self.bundle.to(self.base.device).train()
        self.learned = list(snap["learned"])
        self.mean_attn = [torch.tensor(v) for v in snap["mean_attn"]]
        self.pseudo = copy.deepcopy(snap["pseudo"])
        self.rows = copy.deepcopy(snap["rows"])
        self.attention = copy.deepcopy(snap["attention"])
        self.global_step = snap["global_step"]
        self.shared_dir = None if snap.get("shared_dir") is None else torch.tensor(snap["shared_dir"])
        return self

    # --- learning one task ---------------------------------------------------------------------------

    def _new_bundle(self, task_index: int) -> SAPTBundle:
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, task_index, 0))
            bundle = SAPTBundle(lora_targets(self.base.runtime, cfg.target_patterns), self.base.model.config.hidden_size,
                                rank=cfg.rank, alpha=cfg.lora_alpha, hidden=cfg.hidden, bundle_id=f"train-{cfg.seed}")
        return bundle.to(self.base.device)

    def _constrain_router(self) -> None:
        """Keep the query projection's first layer orthogonal to the pooled embeddings of the bare chat
        template (an empty user turn).

        Max-pooled embeddings of chat prompts are dominated by what every prompt contains (the template,
        its system prompt): prompts of different tasks are ~0.99 cosine-similar. Gradients on the first
        layer (outer products with its input) then mostly move that shared component, and the router
        needs ~100 steps before it starts telling tasks apart (measured on the generated tasks: reverse
        vs upper routing stayed at chance for 60 Adam steps of a direct classification loss). With the
        layer blind to the template's direction (projected out at the start and after every optimizer
        step) the same loss separates them in 10 steps. The direction depends on the model and its
        template only, never on task data; serving is unchanged (the constraint lives in the weights)."""
        tok = self.base.tokenizer
        self.shared_dir = shared_direction(self.base.model, [render_prompt(tok, [{"role": "user", "content": ""}])])
        project_out(self.bundle.query_proj.down.weight, self.shared_dir)

    def _add_block(self, task_index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.seed, task_index, 2))
            task = self.bundle.add_task()
            if self.cfg.key_init > 0:  # the reference code draws keys uniform in [-1, 1]
                with torch.no_grad():
                    task.key.copy_(torch.empty(task.key.shape).uniform_(-self.cfg.key_init, self.cfg.key_init))
        return task

    def learn(self, name: str, task_index: int, *, make_pseudo: bool = True) -> None:
        """Train task ``name`` (at position ``task_index`` of the sequence) and do ARM's bookkeeping."""
        cfg, data = self.cfg, self.pool.get(name)
        if cfg.method == "single" or self.bundle is None:
            self.bundle = self._new_bundle(task_index)
            if cfg.routed:
                self._constrain_router()
        if cfg.routed or self.bundle.num_tasks == 0:
            self._add_block(task_index)
        bundle = self.bundle.requires_grad_(False)
        current = bundle.tasks[-1]
        block = list(current.A) + list(current.B)
        router = [current.key, *bundle.query_proj.parameters()] if cfg.routed else []
        for p in block + router:
            p.requires_grad_(True)
        opt = adam([(block, cfg.lr), (router, cfg.router_lr)])
        seen: list[float] = []  # the new block's weight on this step's training prompts (for the log)

        def attention(prompts):
            a = prompt_attention(self.base.model, bundle, prompts)
            seen.append(float(a[:, -1].detach().mean()))
            return a
        extra = self._arm_term(task_index) if cfg.arm and any(self.pseudo) else None
        log.info("[%s seed %d] task %d/%d %s: %d steps of %d, %d blocks%s", cfg.method, cfg.seed, task_index + 1,
                 len(cfg.task_list), name, cfg.steps, cfg.batch_size, bundle.num_tasks,
                 f", ARM on {sum(map(len, self.pseudo))} pseudo-inputs" if extra else "")

        def next_batch(step: int):
            idx = data.batch(cfg.seed, task_index, step, cfg.batch_size)
            return [data.train_prompts[i] for i in idx], [data.train_replies[i] for i in idx]

        def on_step(rec: dict):
            if seen:
                rec["attn_new"] = sum(seen) / len(seen)
                seen.clear()
            self.global_step += 1
            self.on_record({"event": "step", "method": cfg.method, "seed": cfg.seed, "task": name,
                            "task_index": task_index, "task_step": rec["step"], "task_steps": cfg.steps,
                            **rec, "step": self.global_step})

        keep_blind = (lambda: project_out(bundle.query_proj.down.weight, self.shared_dir)) if cfg.routed else None
        train_steps(self.base, bundle, opt, cfg.steps, cfg.batch_size, cfg.micro_batch, next_batch,
                    attention if cfg.routed else None, extra, on_step, keep_blind)
        bundle.requires_grad_(False)
        self.learned.append(name)
        if cfg.routed:
            self.mean_attn.append(self.evaluator.mean_attention(bundle, data.val_prompts))
        self.pseudo.append(self._pseudo_inputs(data, task_index) if cfg.arm and make_pseudo else [])

    def _arm_term(self, task_index: int):
        """(step) -> (kl_ratio · KL, fields): a batch of old tasks' pseudo-inputs, each pulled towards the
        mean attention its task had when it was learned."""
        cfg, bundle = self.cfg, self.bundle
        pool = [(j, p) for j, prompts in enumerate(self.pseudo) for p in prompts]
        stored = torch.stack([pad_to(v, bundle.num_tasks) for v in self.mean_attn])  # (T_old, T)

        warmup = max(1, round(cfg.arm_warmup * cfg.steps))

        def term(step: int):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, task_index, 3, step))
            pick = torch.randint(len(pool), (min(cfg.arm_batch, len(pool)),), generator=g).tolist()
            tasks = torch.tensor([pool[i][0] for i in pick])
            q = prompt_attention(self.base.model, bundle, [pool[i][1] for i in pick])  # (B, T)
            kl = arm_kl(stored[tasks].to(q.device, q.dtype), q)
            # Ramped in: the new block starts at B = 0, so at first only ARM would move the router, and it
            # would route every input away from the new block before that block learned anything.
            weight = cfg.kl_ratio * min(1.0, (step + 1) / warmup)
            return weight * kl, {"kl": float(kl.detach()), "kl_weight": weight,
                                 "attn_new_on_old": float(q[:, -1].detach().mean())}

        return term

    def _pseudo_inputs(self, data: TaskData, task_index: int) -> list[list[int]]:
        cfg = self.cfg
        n = max(cfg.min_pseudo, math.ceil(cfg.pseudo_fraction * len(data.train_prompts)))

        def on_step(rec: dict):
            self.on_record({"event": "generator", "method": cfg.method, "seed": cfg.seed, "task": data.name,
                            "task_index": task_index, "task_step": rec.pop("step"), "task_steps": cfg.generator_steps,
                            **rec, "step": self.global_step})

        gen = train_generator(self.base, data, self.bundle, seed=cfg.seed, task_index=task_index,
                              steps=cfg.generator_steps, lr=cfg.generator_lr, batch_size=cfg.batch_size,
                              micro_batch=cfg.micro_batch, on_step=on_step)
        return sample_inputs(self.evaluator.engine, self.base, data, gen, n, derive_seed(cfg.seed, task_index, 4))

    # --- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, names: list[str]) -> dict[str, float]:
        """Scores on ``names`` now (one row of a_{i,j}), recorded with the attention of routed methods."""
        res = self.evaluator.score(self.bundle, self.cfg.routed, [self.pool.get(n) for n in names])
        self.rows.append(res.accuracy)
        self.attention.append(res.attention)
        self.on_record({"event": "eval", "method": self.cfg.method, "seed": self.cfg.seed, "after": self.learned[-1],
                        "stage": len(self.learned), "scores": res.accuracy, "attention": res.attention,
                        "eval_s": res.seconds, "step": self.global_step})
        return res.accuracy
