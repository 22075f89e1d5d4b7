"""HTTP routes of the OpenAI-compatible API, and what they share.

- ``state``: the per-app server state (settings, engine once loaded, metrics) and its accessors.
- ``auth``: the optional Bearer API key.
- ``middleware``: request body size limit and per-route request metrics (plain ASGI).
- ``generation``: one HTTP request as engine requests: fan-out over prompts and ``n``, merged outputs,
  abort when the client goes away.
- ``sse``: the Server-Sent Events response that aborts its generation on disconnect.
- ``completions``, ``chat``, ``models``, ``tokenize`` (and /detokenize, /version), ``health``, ``metrics``: the
  routes.
- ``serving``: the steps completions and chat share (limits, tokenization, pass 1 through
  ``experts.pass1``, submission, the answer).
- ``experts`` (with ``expert_uploads``, the upload body): storing, listing and deleting experts.
- ``few_shot``: POST /v1/adaptations, a task's few-shot (CEM) mixture as a background job.
- ``training``: POST /v1/training/sapt, SAPT training as a child process.

Routes validate and translate; they never touch tensors or run model code.
"""
from fastapi import APIRouter


def api_router() -> APIRouter:
    from server.api import chat, completions, experts, few_shot, health, metrics, models, tokenize, training

    router = APIRouter()
    for module in (completions, chat, models, tokenize, experts, few_shot, training, health, metrics):
        router.include_router(module.router)
    return router
