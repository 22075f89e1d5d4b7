"""The SVF training loop (REFERENCE.md §1): one optimizer step per batch of examples.

Per step: take the batch (epoch order from ``seed + epoch``); reinforce: roll out replies with the
current z through the engine (batched, greedy or seeded sampling) and score them (+1 / −1); next_token:
take the tasks' reference replies instead. Then recompute the replies' log-probs with gradients in
micro-batches, backpropagate to z, clip the global gradient norm, take an Adam step. Validation
accuracy (greedy) picks the best z; a checkpoint after every step makes the run resumable exactly.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adapters.svf import init_z
from engine.contract import SamplingParams
from experts.tasks import Example, get_task
from experts.train import checkpoint
from experts.train.config import TrainConfig
from experts.train.objective import next_token_loss, pack, reinforce_loss, scored_logprobs
from experts.store.expert_file import EXPERT_FILE, put_in_store, write_expert_file
from experts.train.rollout import expert_adaptation, frozen_adaptation, generate, make_engine
from experts.train.runlog import CURVES_NAME, RunLog, plot_curves

log = logging.getLogger("t2serve.train")


class SVFTrainer:
    def __init__(self, cfg: TrainConfig, base, *, resume: bool = False):
        self.cfg, self.base = cfg, base
        self.task = get_task(cfg.task)
        self.max_tokens = cfg.max_tokens or self.task.max_tokens
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tok = base.tokenizer
        self.train_set, self.train_prompts = self._prepare(self.task.load(cfg.data, "train"), cfg.train_limit)
        self.val_set, self.val_prompts = self._prepare(self.task.load(cfg.data, "val"), cfg.val_limit)
        if not self.train_set:
            raise ValueError(f"no training examples for task {cfg.task!r} under {cfg.data}")
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        longest = max(len(p) for p in self.train_prompts + self.val_prompts)
        slots = cfg.max_num_seqs or min(cfg.batch_size, 256)
        self.engine = make_engine(base, slots, min(cfg.max_model_len, longest + self.max_tokens))
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.engine.eos_token_ids[0]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.targets = base.runtime.targets
        self._init_state(resume)

    # --- set-up ------------------------------------------------------------------------------------

    def _prepare(self, examples: list[Example], limit: int | None) -> tuple[list[Example], list[list[int]]]:
        """Token ids of each example's prompt; prompts that leave no room for the reply are dropped."""
        keep, prompts = [], []
        for ex in examples[:limit] if limit else examples:
            ids = self.task.prompt_ids(self.base.tokenizer, ex)
            if len(ids) + self.max_tokens <= self.cfg.max_model_len:
                keep.append(ex)
                prompts.append(ids)
        if len(keep) < (min(limit, len(examples)) if limit else len(examples)):
            log.warning("%s: %d prompts longer than max_model_len - max_tokens were skipped", self.task.name,
                        len(examples[:limit] if limit else examples) - len(keep))
        return keep, prompts

    def _init_state(self, resume: bool) -> None:
        cfg, dev = self.cfg, self.base.device
        state = checkpoint.load(self.run_dir)
        if state is not None and not resume:
            raise FileExistsError(f"{self.run_dir} holds a checkpoint at step {state.step}: pass --resume to "
                                  "continue it, or choose another --run-dir")
        g = torch.Generator().manual_seed(cfg.seed)
        z0 = {t.name: init_z(t.rank, cfg.parametrization, g) for t in self.targets}
        if state is not None:
            old = TrainConfig.from_dict(state.config)
            diff = cfg.recipe_mismatch(old)
            if diff:
                raise ValueError(f"cannot resume {self.run_dir}: the recipe differs in {', '.join(diff)}")
            z0 = {n: state.z[n] for n in z0}  # checkpoint tensors come back in file order: use target order
        self.z = {n: torch.nn.Parameter(v.to(dev, torch.float32)) for n, v in z0.items()}
        self.live = expert_adaptation(self.z, cfg.parametrization, cfg.expert_name)
        self.opt = torch.optim.Adam(list(self.z.values()), lr=cfg.lr)
        self.step, self.best_val, self.best_step = 0, None, 0
        self.best_z = {n: v.detach().clone() for n, v in self.z.items()}
        if state is not None:
            self.step, self.best_val, self.best_step = state.step, state.best_val, state.best_step
            self.best_z = {n: state.best_z[n].to(dev) for n in self.z}
            if state.exp_avg:
                self.opt.load_state_dict({"state": {
                    i: {"step": torch.tensor(state.adam_step), "exp_avg": state.exp_avg[n].to(dev),
                        "exp_avg_sq": state.exp_avg_sq[n].to(dev)} for i, n in enumerate(self.z)},
                    "param_groups": self.opt.state_dict()["param_groups"]})
            log.info("resumed %s at step %d (best validation %s at step %d)", self.run_dir, self.step,
                     self.best_val, self.best_step)
        self.runlog = RunLog(self.run_dir, self.step if state is not None else None)
        (self.run_dir / "config.json").write_text(cfg.to_json())

    # --- one step ----------------------------------------------------------------------------------

    def _batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return order[pos * self.cfg.batch_size:(pos + 1) * self.cfg.batch_size].tolist()

    def _rollout_params(self, step: int, n: int) -> list[SamplingParams]:
        if self.cfg.rollout == "greedy":
            return [SamplingParams(max_tokens=self.max_tokens, temperature=0.0)] * n
        return [SamplingParams(max_tokens=self.max_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                               seed=(self.cfg.seed * 1_000_003 + step) * 65_536 + i) for i in range(n)]

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        idx = self._batch(step)
        exs, prompts = [self.train_set[i] for i in idx], [self.train_prompts[i] for i in idx]
        t0 = time.perf_counter()
        rewards, acc, advantages = None, None, None
        if cfg.objective == "reinforce":
            frozen = frozen_adaptation(self.z, cfg.parametrization)
            gens = generate(self.engine, prompts, [frozen] * len(idx), self._rollout_params(step, len(idx)))
            replies = [g.token_ids for g in gens]
            correct = self.task.score_many(exs, [g.text for g in gens])
            rewards = torch.tensor([1.0 if c else -1.0 for c in correct], device=self.base.device)
            acc = sum(correct) / len(correct)
            if cfg.baseline == "mean":  # advantage: only better-than-average replies are pushed up
                advantages = rewards - rewards.mean()
        else:
            enc = self.base.tokenizer
            replies = [enc.encode(e.reference, add_special_tokens=False)[:self.max_tokens - 1] + [self.eos_id]
                       for e in exs]
        gen_s = time.perf_counter() - t0
        loss, kl_sum, grad_norm = self._backward(prompts, replies, rewards if advantages is None else advantages)
        t1 = time.perf_counter()
        self.step += 1
        return {"event": "step", "step": self.step, "epoch": step // self.steps_per_epoch,
                "total_steps": self.total_steps, "loss": loss, "kl": kl_sum / len(idx) if kl_sum is not None else None,
                "reward": None if rewards is None else float(rewards.mean()), "train_acc": acc,
                "grad_norm": grad_norm, "tokens": sum(len(r) for r in replies), "gen_s": round(gen_s, 3),
                "train_s": round(t1 - t0 - gen_s, 3)}

    def _backward(self, prompts, replies, rewards) -> tuple[float, float | None, float]:
        """Accumulate the batch gradient micro-batch by micro-batch, clip, take the Adam step."""
        cfg, rt, model = self.cfg, self.base.runtime, self.base.model
        B, total_tokens = len(prompts), sum(len(r) for r in replies)
        use_kl = cfg.objective == "reinforce" and cfg.kl_coef > 0
        self.opt.zero_grad(set_to_none=True)
        loss_sum, kl_sum = 0.0, (0.0 if use_kl else None)
        for s in range(0, B, cfg.micro_batch):
            sl = slice(s, s + cfg.micro_batch)
            batch = pack(prompts[sl], replies[sl], self.pad_id, self.base.device)
            with rt.activate(rt.plan([self.live] * batch.rows)):
                logp, kl, _ = scored_logprobs(model, batch, rt.activate(None) if use_kl else None)
                if cfg.objective == "reinforce":
                    loss = reinforce_loss(logp, rewards[sl], kl, cfg.kl_coef, B)
                else:
                    loss = next_token_loss(logp, total_tokens)
            loss.backward()
            loss_sum += float(loss.detach())
            if use_kl:
                kl_sum += float(kl.detach().sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.z.values()), cfg.clip)
        self.opt.step()
        return loss_sum, kl_sum, float(grad_norm)

    # --- validation, checkpoints, the loop ---------------------------------------------------------

    def validate(self) -> dict | None:
        if not self.val_set:
            return None
        t0 = time.perf_counter()
        frozen = frozen_adaptation(self.z, self.cfg.parametrization)
        greedy = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        gens = generate(self.engine, self.val_prompts, [frozen] * len(self.val_set), [greedy] * len(self.val_set))
        acc = sum(self.task.score_many(self.val_set, [g.text for g in gens])) / len(self.val_set)
        if self.best_val is None or acc > self.best_val:
            self.best_val, self.best_step = acc, self.step
            self.best_z = {n: v.detach().clone() for n, v in self.z.items()}
        return {"event": "val", "step": self.step, "val_acc": acc, "val_n": len(self.val_set),
                "best_val": self.best_val, "best_step": self.best_step, "val_s": round(time.perf_counter() - t0, 3)}

    def save_checkpoint(self) -> None:
        st = self.opt.state
        params = list(self.z.items())
        has = bool(st) and all(p in st for _, p in params)
        checkpoint.save(self.run_dir, checkpoint.TrainState(
            step=self.step, z={n: p.detach() for n, p in params},
            exp_avg={n: st[p]["exp_avg"] for n, p in params} if has else {},
            exp_avg_sq={n: st[p]["exp_avg_sq"] for n, p in params} if has else {},
            adam_step=float(st[params[0][1]]["step"]) if has else 0.0,
            best_z=self.best_z, best_val=self.best_val, best_step=self.best_step, config=asdict(self.cfg)))

    def run(self) -> dict:
        t_start = time.perf_counter()
        log.info("%s: %d train / %d val examples, %d steps (%d per epoch), batch %d, %s, targets %s",
                 self.task.name, len(self.train_set), len(self.val_set), self.total_steps, self.steps_per_epoch,
                 self.cfg.batch_size, self.cfg.objective, self.cfg.targets)
        if self.step == 0 and self.best_val is None:  # the starting point (≈ the base model) is a candidate too
            rec = self.validate()
            if rec:
                self.runlog.write(rec)
            self.save_checkpoint()
        while self.step < self.total_steps:
            self.runlog.write(self.train_step())
            if self.step % self.cfg.val_every == 0 or self.step == self.total_steps:
                rec = self.validate()
                if rec:
                    self.runlog.write(rec)
            self.save_checkpoint()
        return self.finish(time.perf_counter() - t_start)

    def finish(self, seconds: float) -> dict:
        cfg = self.cfg
        z = self.best_z if self.best_val is not None else {n: v.detach() for n, v in self.z.items()}
        meta = {"category": self.task.category, "task": self.task.name, "objective": cfg.objective,
                "targets": cfg.targets, "best_step": self.best_step, "val_acc": self.best_val,
                "base_model": self.base.name}
        write_expert_file(self.run_dir / EXPERT_FILE, cfg.expert_name, z, cfg.parametrization, meta)
        stored = None
        improved = self.best_val is not None and self.best_step > 0
        if cfg.store and (cfg.store_when == "always" or improved):
            desc = (f"SVF expert for {self.task.name} ({cfg.objective}, {cfg.targets}, step {self.best_step} of "
                    f"{self.step}, validation accuracy {self.best_val})")
            stored = put_in_store(Path(cfg.store), self.base, cfg.expert_name, z, cfg.parametrization,
                                  self.task.category, desc)
        plot_curves(self.runlog.records, self.run_dir / CURVES_NAME)
        summary = {"task": self.task.name, "expert": cfg.expert_name, "steps": self.step,
                   "best_step": self.best_step, "best_val": self.best_val, "seconds": round(seconds, 1),
                   "expert_file": str(self.run_dir / EXPERT_FILE), "stored": stored}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %s", summary)
        return summary
