"""SAPT training started through the HTTP API: ``train sapt`` run as a child process of the server.

Training never runs in the server process: it needs gradients through the model, its own copy of the
weights and minutes of full CPU or GPU use, while the server must go on answering. The child is the same
``python -m experts.train sapt`` a user would run, on the model folder, device and dtype the server uses
(so the bundle validates against the server's base model), writing the bundle into the server's expert
store through the store's lock. Its JSON-lines log is read while it runs for the job's progress; when
it ends, the store is re-read at once (the store watcher would see it within its interval anyway) and
the job's result is the run's ``matrix.json`` summary. Cancelling the job stops the child; the child dies
with the server however it ends, and a server that starts after a crash ends leftovers
(``experts.train.lifeline``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from experts.train.lifeline import PARENT_ENV, forget_child, record_child

log = logging.getLogger("t2serve.sapt")

POLL_S = 0.5  # seconds between reads of the child's log for progress
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this


@dataclass
class SAPTJobSpec:
    name: str  # bundle name in the store
    tasks: list[str]
    model: str  # the server's Hugging Face folder
    device: str
    dtype: str
    store: str
    run_dir: str
    options: dict[str, Any]  # SAPTConfig fields given by the request (steps, batch_size, ...)
    data: str | None = None
    threads: int | None = None

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "experts.train", "sapt", "--tasks", ",".join(self.tasks), "--model", self.model,
                "--device", self.device, "--dtype", self.dtype, "--store", self.store, "--name", self.name,
                "--run-dir", self.run_dir]
        if self.data:
            args += ["--data", self.data]
        if self.threads:
            args += ["--threads", str(self.threads)]
        for key, value in self.options.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return args


def fold_progress(progress: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    """``progress`` updated with the run log's new ``records``: where the run is (phase, task, step of the
    task, last loss), optimizer steps done over all tasks, and the last scores."""
    for r in records:
        event = r.get("event")
        if event == "step":
            progress["steps_done"] += 1
            progress.update(phase="training", task=r["task"], task_index=r["task_index"] + 1,
                            task_step=r["task_step"], task_steps=r["task_steps"], loss=r["loss"])
        elif event == "generator":
            progress.update(phase="pseudo-sample generator", task=r["task"], task_index=r["task_index"] + 1,
                            task_step=r["task_step"], task_steps=r["task_steps"], loss=r["loss"])
        elif event == "eval":
            progress.update(phase="evaluated", scores=r["scores"])
    return progress


def _read_new(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` from byte ``offset``; a partly written last line waits."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return records, offset + end


async def run_sapt_job(spec: SAPTJobSpec, on_progress: Callable[[dict], None]) -> dict[str, Any]:
    """Run the child to the end; returns the run's summary (``matrix.json``). Raises RuntimeError with
    the tail of the child's output if it fails; on cancellation the child is stopped."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path = run_dir / "train.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*spec.argv(), stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                    env=env, start_new_session=True)
    record_child(run_dir, proc.pid, {"name": spec.name})
    log.info("SAPT training %s started (pid %d): %s", spec.name, proc.pid, ",".join(spec.tasks))
    progress: dict[str, Any] = {"tasks": len(spec.tasks), "phase": "starting", "steps_done": 0}
    offset = 0
    try:
        while True:
            try:
                await asyncio.wait_for(proc.wait(), POLL_S)
                done = True
            except asyncio.TimeoutError:
                done = False
            new, offset = _read_new(run_dir / "log.jsonl", offset)
            if new:
                on_progress(dict(fold_progress(progress, new)))
            if done:
                break
    except asyncio.CancelledError:
        await _stop(proc)
        raise
    finally:
        if proc.returncode is not None:
            forget_child(run_dir)
    if proc.returncode != 0:
        tail = out_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"training exited with code {proc.returncode}: " + " | ".join(tail))
    return json.loads((run_dir / "matrix.json").read_text())


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the child and anything it started (sandboxes, workers)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except asyncio.TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    except ProcessLookupError:
        pass
    log.info("SAPT training (pid %d) stopped", proc.pid)
