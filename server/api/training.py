"""SAPT training through the API: POST /v1/training/sapt starts ``train sapt`` as a child process of the
server (never in the server process; see ``experts.sapt.job``) and returns its job at once;
GET /v1/training/{id} reports progress and the result; DELETE /v1/training/{id} stops it. The bundle goes
into this server's expert store under ``name`` and is served by the ``sapt`` strategy when the job is done.
One training at a time: it takes the machine's cores (or GPU) next to the server's own work."""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api.auth import require_admin_key, require_read_key
from server.api.serving import ERROR_RESPONSES
from server.api.state import cancel_job, job_of_kind, ready_engine, server_state
from server.errors import APIError, invalid_request
from server.jobs import JobLimitError

log = logging.getLogger("t2serve.training")
router = APIRouter(tags=["training"])
KIND = "sapt_train"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class SAPTTraining(BaseModel):
    """What ``train sapt`` takes, bounded; defaults are its own (``experts/sapt/config.py``)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=NAME, description="bundle name in the expert store")
    tasks: list[str] = Field(min_length=1, max_length=16, description="task names in learning order")
    steps: int | None = Field(None, ge=1, le=100_000, description="optimizer steps per task")
    batch_size: int | None = Field(None, ge=1, le=1024)
    micro_batch: int | None = Field(None, ge=1, le=1024)
    rank: int | None = Field(None, ge=1, le=64)
    lora_targets: str = Field("q_proj,v_proj", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.,]+$",
                              description="matrices with LoRA blocks; the server must adapt them")
    lr: float | None = Field(None, gt=0, le=1)
    router_lr: float | None = Field(None, gt=0, le=1)
    kl_ratio: float | None = Field(None, ge=0, le=100, description="ARM's weight; 0 disables ARM")
    generator_steps: int | None = Field(None, ge=0, le=100_000)
    train_limit: int | None = Field(None, ge=1, le=10_000_000)
    test_limit: int | None = Field(None, ge=1, le=100_000)
    eval_every_task: int | None = Field(None, ge=0, le=1, description="1: score the learned tasks after each")
    seed: int = Field(0, ge=0, le=2**31 - 1)


def _check_targets(engine, lora_targets: str) -> None:
    """Every matrix the bundle would put a LoRA block on must be one the server adapts, or the store would
    refuse the bundle after the whole training. Names are matched as training matches them: the module's
    full name or a dotted suffix of it."""
    from adapters.targets import _matches, target_kind

    served = {t.name for t in (engine.runtime.targets if engine.runtime is not None else ())}
    wanted: set[str] = set()
    for p in (p for p in lora_targets.split(",") if p):
        hits = {name for name, m in engine.model.named_modules()
                if _matches(name, p) and (name in served or target_kind(m) is not None)}
        if not hits:
            raise invalid_request(f"lora_targets: {p!r} names no linear layer of the model", param="lora_targets")
        wanted |= hits
    missing = sorted(wanted - served)
    if missing:
        raise invalid_request(f"this server does not adapt {missing[0]} (and {len(missing) - 1} more) named by "
                              "lora_targets: start it with --adapt-targets attn or all, or name adapted matrices",
                              param="lora_targets", code="targets_not_adapted")


async def end_leftover_training(state) -> None:
    """At start: end the training children a previous server process left running (it was killed before
    it could stop them) and report their jobs as failed."""
    from experts.train.lifeline import end_leftovers

    for r in await asyncio.to_thread(end_leftovers, state.settings.cache_dir / "training"):
        ended = (f"; its training process (pid {r['pid']}) was still running and has been ended"
                 if r["was_running"] else "")
        log.warning("training job %s: the server stopped while it ran%s", r["job_id"], ended)
        state.jobs.failed(r["job_id"], KIND, str(r["job"].get("name", "")),
                          "the server stopped while the job ran" + ended)


@router.post("/v1/training/sapt", status_code=202, responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]},
             dependencies=[Depends(require_admin_key)], summary="Start SAPT training of a task sequence")
async def create_training(body: SAPTTraining, request: Request) -> dict:
    from engine.loader import holds_weights, resolve_dtype, resolve_model_folder
    from experts.sapt.job import SAPTJobSpec, run_sapt_job
    from experts.tasks import get_task
    from experts.tasks.synthetic import SyntheticTask

    engine, state = ready_engine(request), server_state(request)
    settings = state.settings
    if state.store is None or not holds_weights(engine.model):
        raise APIError(503, "training needs the native engine and an open expert store", type="server_error",
                       code="training_unavailable")
    if body.name == engine.model_name:  # `model` would name the bundle and the base model at once
        raise invalid_request(f"{body.name!r} is the served model's name; choose another name for the bundle",
                              param="name", code="invalid_name")
    if len(set(body.tasks)) != len(body.tasks):
        raise invalid_request("tasks names a task twice", param="tasks")
    for name in body.tasks:
        try:
            task = get_task(name)
        except ValueError as e:
            raise invalid_request(str(e), param="tasks", code="unknown_task") from e
        if not isinstance(task, SyntheticTask) and settings.train_data_dir is None:
            raise invalid_request(f"task {name!r} reads its data from files: start the server with "
                                  "--train-data-dir", param="tasks", code="no_training_data")
    _check_targets(engine, body.lora_targets)
    existing = state.registry.get(body.name)
    if existing is not None and existing.meta.get("kind") != "sapt":
        raise invalid_request(f"{body.name!r} names an expert that is not a SAPT bundle", param="name")
    options = body.model_dump(exclude={"name", "tasks"}, exclude_none=True)
    device = engine.model.device
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")

    async def work(job) -> dict:
        folder, _ = await asyncio.to_thread(resolve_model_folder, settings.model, settings.cache_dir)
        spec = SAPTJobSpec(name=body.name, tasks=list(body.tasks), model=str(folder), device=str(device), dtype=dtype,
                           store=str(settings.resolved_expert_dir()), run_dir=str(settings.cache_dir / "training" / job.id),
                           options=options, data=None if settings.train_data_dir is None else str(settings.train_data_dir),
                           threads=settings.threads)
        job.progress = {"tasks": len(spec.tasks), "phase": "starting", "steps_done": 0, "run_dir": spec.run_dir}

        def progress(p: dict) -> None:
            job.progress = {**p, "run_dir": spec.run_dir}

        summary = await run_sapt_job(spec, progress)
        await asyncio.to_thread(state.store.refresh, True)  # served now, not at the watcher's next look
        stored = state.store.get(body.name)
        return {"expert": body.name, "version": None if stored is None else stored.record.version,
                "tasks": summary["tasks"], "seconds": summary["seconds"], "metrics": summary.get("metrics"),
                "matrix": summary.get("matrix"), "attention": summary.get("attention"), "run_dir": spec.run_dir}

    try:  # one at a time: the check and the start happen in one step (no await between them)
        job = state.jobs.start(KIND, body.name, work, limit=1)
    except JobLimitError as e:
        raise APIError(409, "a training job is already running", code="job_running") from e
    return job.view()


@router.get("/v1/training/{job_id}", responses=ERROR_RESPONSES, dependencies=[Depends(require_read_key)],
            summary="Progress and result of a training job")
async def get_training(job_id: str, request: Request) -> dict:
    return job_of_kind(request, job_id, KIND, "training").view()


@router.delete("/v1/training/{job_id}", responses=ERROR_RESPONSES, dependencies=[Depends(require_admin_key)],
               summary="Stop a training job")
async def cancel_training(job_id: str, request: Request) -> dict:
    return await cancel_job(request, job_id, KIND, "training")
