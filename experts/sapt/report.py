"""What a SAPT run reports: the metrics table (printed and Markdown), the a_{i,j} matrices in Markdown,
and the heat map of attention weights on each task's test inputs (PNG; needs matplotlib, skipped with
a note without it).

Scores are fractions in the JSON and percentages in the tables.
"""
from __future__ import annotations

import logging
from pathlib import Path
from statistics import mean

log = logging.getLogger("t2serve.sapt")

LABELS = {"sapt": "SAPT", "sapt_noarm": "SAPT w/o ARM", "seqlora": "SeqLoRA", "single": "LoRA alone"}
METRICS = ("AP", "F.Ra", "FWT", "BWT")
FWT_NOTE = ("FWT = mean_j (a_jj - alone_j), alone_j: a LoRA of the same shape trained on task j alone; "
            "F.Ra = mean_{j<T} (max_{j<=i<T} a_ij - a_Tj); BWT divides by T-1.")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summarize(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, dict]]:
    """[{method: metrics}] per seed -> {method: {metric: {"mean", "per_seed"}}}."""
    out: dict[str, dict[str, dict]] = {}
    for method in per_seed[0]:
        out[method] = {}
        for m in METRICS:
            vals = [run[method][m] for run in per_seed]
            known = [v for v in vals if v is not None]
            out[method][m] = {"mean": mean(known) if known else None, "per_seed": vals}
    return out


def metrics_table(summary: dict[str, dict[str, dict]], seeds: list[int]) -> str:
    """Markdown: one row per method, each metric as mean and its per-seed values."""
    head = "| method | " + " | ".join(f"{m} (%)" for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for method, ms in summary.items():
        cells = []
        for m in METRICS:
            per = ms[m]["per_seed"]
            cells.append(_pct(ms[m]["mean"]) + (" (" + ", ".join(_pct(v) for v in per) + ")" if len(per) > 1 else ""))
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    seeds_note = f"seeds {', '.join(map(str, seeds))}: mean (per seed)" if len(seeds) > 1 else f"seed {seeds[0]}"
    return "\n".join(lines) + f"\n\n{seeds_note}. {FWT_NOTE}"


def matrix_markdown(rows: list[dict[str, float]], tasks: list[str], title: str) -> str:
    """a_{i,j}: row i = after learning tasks 1..i, column j = task j (blank: not learned yet)."""
    lines = [f"**{title}**", "", "| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for i, row in enumerate(rows):
        lines.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(_pct(row[t]) if t in row else "" for t in tasks) + " |")
    return "\n".join(lines)


def plot_attention(panels: dict[str, dict[str, list[float]]], tasks: list[str], out: Path) -> bool:
    """One heat map per panel (e.g. SAPT, SAPT w/o ARM): row = a task's test inputs, column = the block
    they are routed to (mean attention weight). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (pip install matplotlib, or t2serve[train])", out.name)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2.4, 3.6), squeeze=False,
                             constrained_layout=True)
    for k, (ax, (title, attn)) in enumerate(zip(axes[0], panels.items())):
        grid = [attn[t] for t in tasks]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(tasks)), [f"{j + 1}: {t}" for j, t in enumerate(tasks)], rotation=30, fontsize=8)
        ax.set_yticks(range(len(tasks)), [f"{t} inputs" for t in tasks] if k == 0 else [], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block (task learned)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean attention")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True
