"""Helpers shared by the benchmarks: timing with device sync, memory peaks, result tables."""
from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

import torch

from engine.spec import EngineSpec, ModelSpec
from experts.train.memory import peak_gpu_mb, peak_rss_mb  # noqa: F401  (re-exported to the benchmarks)


class MemorySampler:
    """Peak memory in use on the device (all processes), sampled every 50 ms while running."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def __enter__(self):
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mb(self) -> float | None:
        return self.peak / 2**20 if self.peak else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def engine_spec(model: str | None, device: str, max_num_seqs: int, max_model_len: int) -> EngineSpec:
    """The native engine's spec for a benchmark (no pydantic-settings needed: absent on some GPU boxes)."""
    return EngineSpec(ModelSpec(model=model, device=device), max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                      max_prefill_tokens=4096, max_waiting=100_000)


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
        print(f"wrote {path}")


def data_dir(given: str | None) -> str:
    """The benchmark data root: ``given``, else ``$T2_DATA_DIR`` (the name every command uses); otherwise
    exit 2 with one line saying what is expected where."""
    import sys

    from experts.tasks.base import DATA_ENV, DATA_LAYOUT, DataMissingError, data_root

    try:
        root = data_root(given)
    except DataMissingError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    if root is None:
        sys.exit(f"{Path(sys.argv[0]).name}: error: no benchmark data: pass --data DIR or set {DATA_ENV}, laid out "
                 f"as {DATA_LAYOUT}")
    return root


def report_host_only(args, rows: list[dict], cols: list[str]) -> None:
    """The end of a benchmark that does no GPU work: its table, its memory (peak GPU: none) and its JSON."""
    print_table(rows, cols)
    mem = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": None}
    print(f"peak RSS {mem['peak_rss_mb']:.0f} MiB; peak GPU 0 MiB (no GPU work)")
    write_json(args.out, {"machine": machine(), "settings": vars(args), "rows": rows, "memory": mem})
