"""Background jobs with progress (few-shot CEM searches, SAPT training): started by a request, polled by id,
cancelled by id.

Jobs run as asyncio tasks on the server's event loop; their heavy work is engine requests (run on the
engine thread at background priority) or a child process, so the loop stays free. ``start`` checks the
number of jobs of a kind and starts the job in one step, with no await in between: concurrent requests
cannot both pass the check. Finished jobs are kept (bounded) for their results.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

log = logging.getLogger("t2serve.jobs")


class JobLimitError(Exception):
    """As many jobs of this kind as allowed are queued or running already."""

    def __init__(self, kind: str, limit: int):
        super().__init__(f"{limit} {kind} job(s) are running already; at most {limit} at a time")
        self.kind, self.limit = kind, limit


@dataclass
class Job:
    id: str
    kind: str
    task: str  # the task name the result is stored under
    status: str = "queued"  # queued | running | done | failed
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    _task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "adaptation.job", "kind": self.kind, "task": self.task,
                "status": self.status, "progress": self.progress, "result": self.result, "error": self.error,
                "created": int(self.created), "finished": None if self.finished is None else int(self.finished)}


class JobBoard:
    def __init__(self, keep: int = 100):
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def start(self, kind: str, task: str, work: Callable[[Job], Awaitable[dict]], limit: int | None = None) -> Job:
        """Start ``work`` as a job, unless ``limit`` jobs of ``kind`` are queued or running (JobLimitError).
        Synchronous on purpose: the check and the start are one step of the event loop."""
        if limit is not None and sum(1 for j in self._jobs.values() if j.kind == kind and j.active) >= limit:
            raise JobLimitError(kind, limit)
        job = Job(f"adapt-{uuid.uuid4().hex[:16]}", kind, task)
        self._jobs[job.id] = job
        job._task = asyncio.get_running_loop().create_task(self._run(job, work))
        self._trim()
        return job

    def done(self, kind: str, task: str, result: dict) -> Job:
        """Record a job answered without running (a stored result reused)."""
        return self._ended(Job(f"adapt-{uuid.uuid4().hex[:16]}", kind, task, status="done", result=result))

    def failed(self, job_id: str, kind: str, task: str, error: str) -> Job:
        """Record a job that failed outside this board (one a previous server process was running)."""
        return self._ended(Job(job_id, kind, task, status="failed", error=error))

    def _ended(self, job: Job) -> Job:
        job.finished = time.time()
        self._jobs[job.id] = job
        self._trim()
        return job

    async def _run(self, job: Job, work) -> None:
        job.status = "running"
        try:
            job.result = await work(job)
            job.status = "done"
        except asyncio.CancelledError:
            job.status, job.error = "failed", "cancelled"
            raise
        except Exception as e:  # reported through the job, never lost
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def running(self, kind: str) -> Job | None:
        """A queued or running job of this kind, if any."""
        return next((j for j in self._jobs.values() if j.kind == kind and j.active), None)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (its work stops what it started); False if it had ended."""
        job = self._jobs.get(job_id)
        if job is None or job._task is None or job._task.done():
            return False
        job._task.cancel()
        await asyncio.gather(job._task, return_exceptions=True)
        return True

    def running_for(self, task: str) -> Job | None:
        return next((j for j in self._jobs.values() if j.task == task and j.active), None)

    async def cancel_all(self) -> None:
        tasks = [j._task for j in self._jobs.values() if j._task is not None and not j._task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _trim(self) -> None:
        while len(self._jobs) > self.keep:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].active:
                break
            self._jobs.popitem(last=False)
