"""Few-shot adaptations: POST /v1/adaptations starts a CEM search over mixing weights for a task and
returns its job id at once; GET /v1/adaptations/{id} reports progress and the result. The result is
stored as a `mixture` expert named after the task, so requests use it with `adaptation: {"task": name}`.
The same inputs (experts by content, examples, settings, seed) reuse the stored result instead of
searching again. At most ``max_adaptation_jobs`` run at once (429 beyond); DELETE /v1/adaptations/{id}
cancels one. A search's engine requests run at background priority: users' requests are admitted first."""
from __future__ import annotations

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from experts.pass1.cem import CEMConfig
from experts.pass1.few_shot import FewShotSearch, FewShotSpec, Shot
from server.api.auth import require_admin_key, require_read_key
from server.api.serving import ERROR_RESPONSES
from server.api.state import cancel_job, job_of_kind, ready_engine, server_state
from server.errors import APIError, invalid_request
from server.jobs import JobLimitError

router = APIRouter(tags=["adaptations"])
KIND = "few_shot"


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=20_000)
    answer: str = Field(min_length=1, max_length=20_000)


class CEMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    population: int = Field(32, ge=2, le=256)
    elite_ratio: float = Field(0.2, gt=0, le=1)
    generations: int = Field(50, ge=1, le=500)
    init_std: float = Field(0.5, gt=0, le=10)
    clamp: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description="[low, high] bounds of α")
    per_matrix: bool = False  # α per expert × matrix (K × M) instead of per expert (K)
    seed: int = 0


class AdaptationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    experts: list[str] = Field(min_length=1, max_length=16)
    examples: list[Example] = Field(min_length=1, max_length=64)
    cem: CEMSettings = Field(default_factory=CEMSettings)
    fitness: str = Field("loglik", pattern="^(loglik|exact_match)$")


@router.post("/v1/adaptations", status_code=202, responses=ERROR_RESPONSES, dependencies=[Depends(require_admin_key)],
             summary="Start a few-shot (CEM) adaptation for a task")
async def create_adaptation(body: AdaptationCreate, request: Request) -> dict:
    engine, state = ready_engine(request), server_state(request)
    if state.store is None:
        raise APIError(503, "the expert store is not open yet", type="server_error", code="store_unavailable")
    entries = []
    for name in body.experts:
        e = state.registry.get(name)
        if e is None or e.meta.get("kind", "svf") not in ("svf", "mixture"):
            raise invalid_request(f"unknown SVF expert: {name}", param="experts", code="expert_not_found")
        entries.append(e)
    if len({tuple(e.expert.z) for e in entries}) != 1:
        raise invalid_request("the experts must adapt the same matrices", param="experts")
    c = body.cem
    spec = FewShotSpec(body.task, list(body.experts), [Shot(x.prompt, x.answer) for x in body.examples],
                       CEMConfig(c.population, c.elite_ratio, c.generations, c.init_std, None, tuple(c.clamp), c.seed),
                       per_matrix=c.per_matrix, fitness=body.fitness)
    try:
        spec.cem.check()
    except ValueError as e:
        raise invalid_request(str(e), param="cem") from e
    digest = spec.digest([e.expert.digest() for e in entries])
    source = f"few_shot:{digest}"
    jobs = state.jobs
    stored = state.registry.get(body.task)
    if stored is not None and stored.meta.get("source") == source:  # computed before: reuse, don't search again
        return jobs.done(KIND, body.task, {"expert": body.task, "reused": True, **stored.meta.get("result", {})}).view()
    if stored is not None and stored.meta.get("kind") != "mixture":
        raise invalid_request(f"{body.task!r} names an expert that is not a few-shot result", param="task")
    if jobs.running_for(body.task) is not None:
        raise APIError(409, f"an adaptation for task {body.task!r} is already running", code="job_running")
    try:
        search = FewShotSearch(engine, spec, [e.expert for e in entries])
    except ValueError as e:
        raise invalid_request(str(e), param="examples") from e

    async def work(job) -> dict:
        def progress(gen, res):
            job.progress = {"generation": gen, "generations": spec.cem.generations, "best_fitness": res.best_fitness}

        res = await search.run(progress)
        alpha = res.best.to(torch.float32)
        from experts.store.validation import ExpertDraft  # the store's input type

        draft = ExpertDraft(name=body.task, kind="mixture", tensors={"alpha": alpha}, category="task",
                            experts=tuple(body.experts), alpha_targets=tuple(search.targets) if c.per_matrix else None,
                            description=f"few-shot CEM over {', '.join(body.experts)}", source=source)
        import asyncio

        await asyncio.to_thread(state.store.put, draft)
        return {"expert": body.task, "reused": False, "alpha": alpha.tolist(), "experts": list(body.experts),
                "best_fitness": res.best_fitness, "history": res.history}

    try:
        return jobs.start(KIND, body.task, work, limit=state.settings.max_adaptation_jobs).view()
    except JobLimitError as e:
        raise APIError(429, f"{e}; retry when one has finished or cancel one (DELETE /v1/adaptations/{{id}})",
                       type="rate_limit_error", code="too_many_jobs") from e


@router.get("/v1/adaptations/{job_id}", responses=ERROR_RESPONSES, dependencies=[Depends(require_read_key)],
            summary="Progress and result of an adaptation job")
async def get_adaptation(job_id: str, request: Request) -> dict:
    return job_of_kind(request, job_id, KIND, "adaptation").view()


@router.delete("/v1/adaptations/{job_id}", responses=ERROR_RESPONSES, dependencies=[Depends(require_admin_key)],
               summary="Cancel an adaptation job")
async def cancel_adaptation(job_id: str, request: Request) -> dict:
    """Stops the search: its engine requests still queued or running are aborted; nothing is stored."""
    return await cancel_job(request, job_id, KIND, "adaptation")
