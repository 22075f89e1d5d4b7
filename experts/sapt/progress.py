"""Progress of a SAPT run: every record as one JSON line (``log.jsonl``, the training log format), and a
short terminal line for every ``every``-th step, each generator's last step and each evaluation."""
from __future__ import annotations

from pathlib import Path

from experts.train.runlog import RunLog


def _pct(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {100 * v:.0f}%" for k, v in scores.items())


def format_record(r: dict) -> str | None:
    head = f"[{r['method']} seed {r['seed']}]"
    if r["event"] == "eval":
        line = f"{head} after {r['stage']} task(s) ({r['after']}): {_pct(r['scores'])} ({r['eval_s']:.1f}s)"
        if r.get("attention"):
            line += " | attention " + "; ".join(f"{k} " + "/".join(f"{a:.2f}" for a in v)
                                                for k, v in r["attention"].items())
        return line
    if r["event"] in ("step", "generator"):
        what = "task" if r["event"] == "step" else "generator of"
        kl = f" kl {r['kl']:.4f}" if r.get("kl") is not None else ""
        if r.get("attn_new") is not None:  # routing: the new block's weight on new / on old tasks' inputs
            kl += f" | new block {r['attn_new']:.2f}" + (f" (old inputs {r['attn_new_on_old']:.2f})"
                                                         if r.get("attn_new_on_old") is not None else "")
        return (f"{head} {what} {r['task_index'] + 1} {r['task']} step {r['task_step']}/{r['task_steps']}: "
                f"loss {r['loss']:.4f}{kl} grad {r['grad_norm']:.2e} ({r['step_s']:.2f}s)")
    return None


class SAPTLog(RunLog):
    def __init__(self, run_dir: Path, resume_step: int | None = None, every: int = 10):
        super().__init__(run_dir, resume_step)
        self.every = every

    def terminal_line(self, record: dict) -> str | None:
        """Every ``every``-th step, each generator's last step and each evaluation."""
        last = record.get("task_step") == record.get("task_steps")
        if record["event"] == "step" and not (record["task_step"] % self.every == 0 or last):
            return None
        if record["event"] == "generator" and not last:
            return None
        return format_record(record)
