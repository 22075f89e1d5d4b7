"""What a training run reports: one JSON line per step (``log.jsonl``), one terminal line per step, and
a PNG of the learning curves (``curves.png``, needs matplotlib; skipped with a note without it).

Replot any run later with ``python -m experts.train.runlog RUN_DIR``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("t2serve.train")
LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"


class RunLog:
    """The JSON-lines log of a run (SVF training; SAPT's ``SAPTLog`` chooses its own terminal lines)."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / LOG_NAME
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            # Keep what the checkpoint covers; steps logged after it are repeated by the resumed run.
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        """Append ``record`` to the log, and print its terminal line if it has one."""
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = self.terminal_line(record)
        if line:
            print(line, file=sys.stderr, flush=True)

    def terminal_line(self, record: dict) -> str | None:
        return format_line(record)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_line(r: dict) -> str:
    if r.get("event") == "val":
        return (f"[val] step {r['step']}: accuracy {_fmt(r['val_acc'], '.3f')} on {r['val_n']} "
                f"(best {_fmt(r.get('best_val'), '.3f')} at step {r.get('best_step')}) {r['val_s']:.1f}s")
    return (f"step {r['step']}/{r['total_steps']} ep {r['epoch']} | reward {_fmt(r.get('reward'), '+.3f')} "
            f"acc {_fmt(r.get('train_acc'), '.3f')} | loss {_fmt(r['loss'], '.4g')} kl {_fmt(r.get('kl'), '.3g')} "
            f"| grad {_fmt(r['grad_norm'], '.2e')} | gen {r['gen_s']:.1f}s train {r['train_s']:.1f}s "
            f"| {r['tokens']} tok")


def plot_curves(records: list[dict], out: Path) -> bool:
    """Train accuracy, validation accuracy and loss against the step; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (pip install matplotlib, or t2serve[train])", out.name)
        return False
    steps = [r for r in records if r.get("event") == "step"]
    vals = [r for r in records if r.get("event") == "val"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps and steps[0].get("train_acc") is not None:
        ax_acc.plot([r["step"] for r in steps], [r["train_acc"] for r in steps], label="train (rollouts)", alpha=.7)
    if vals:
        ax_acc.plot([r["step"] for r in vals], [r["val_acc"] for r in vals], "o-", label="validation")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="loss")
    kl = [r for r in steps if r.get("kl") is not None]  # (SAPT's phases log no KL on some steps)
    if any(r["kl"] for r in kl):
        ax_loss.plot([r["step"] for r in kl], [r["kl"] for r in kl], label="KL")
    ax_loss.set(xlabel="step", title="objective")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    run = Path(sys.argv[1])
    recs = [json.loads(x) for x in (run / LOG_NAME).read_text().splitlines() if x.strip()]
    print("wrote" if plot_curves(recs, run / CURVES_NAME) else "matplotlib missing:", run / CURVES_NAME)
