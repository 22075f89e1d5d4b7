"""``VLLMEngine``: the engine contract of ``engine.factory`` served by vLLM's AsyncLLM.

vLLM serves adaptations one way: per-row tables inside its own batches (``engine.vllm.rows``). A request's
adaptation becomes a small recipe in its ``SamplingParams.extra_args`` (``RowRouter.acquire``), every
worker turns it into the request's row when vLLM admits it, and every adapted layer applies each token's
row; base requests carry no recipe and read the base row. With no adapted matrices (``adapt_targets``
none, or SVF off and no SAPT bank) this is stock vLLM.

One asyncio loop owns the AsyncLLM and the rows' registrations. By default it is a loop of the engine's own
thread; a server passes its own loop instead (``loop=``), as vLLM's own server runs its AsyncLLM on the
loop that serves HTTP: then vLLM's output handler, this engine and the callers share one loop and one
thread, and an output reaches its caller's queue directly. Callers on any other loop get their outputs in
batches (``engine.frontend``, the one front end both engines share: admission, streams, hand-off, abort). Score requests become prompt log-probability requests.

The host keeps a skeleton of the base model (modules on the meta device, input embeddings loaded): SAPT
routes prompts with its embeddings and the expert store fingerprints weights through it; vLLM's workers
hold the weights.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

import torch

from adapters.targets import Target
from engine.cache import scratch_alive
from engine.contract import (
    EngineDeadError,
    EngineError,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    Structure,
    TokenLogprob,
)
from engine.frontend import FrontEnd
from engine.loader import eos_ids, load_skeleton, resolve_model_folder
from engine.spec import EngineSpec, default_cache_dir, spec_from
from engine.vllm.row_router import RowRouter, RowsView
from engine.vllm.rows import RECIPE_KEY
from engine.vllm.rows_worker import CONFIG_KEY, RowsConfig, guidance_validator, start_output_handler
from engine.vllm.scoring import prompt_token_logprobs, score_prompts, score_result, token_logprobs

_SET_HERE = "T2_SET_V2_RUNNER"  # VLLM_USE_V2_MODEL_RUNNER was set by this process, not by the user

log = logging.getLogger("t2serve.vllm")

WORKER_EXTENSION = "engine.vllm.worker.RowsExtension"
SCORE_BUDGET = 2  # tokens a score request needs beyond its prompt (a label, and the one generated)


@dataclass
class VLLMOptions:
    """What the vLLM engine is built from (``from_spec`` maps an ``EngineSpec`` onto it; benchmarks set the
    fields below ``max_experts`` too)."""

    model: str  # Hugging Face folder
    served_name: str
    cache_dir: Path = field(default_factory=default_cache_dir)
    dtype: str = "bfloat16"
    adapt_targets: str = "mlp"  # matrices experts adapt (the setting of the same name)
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_waiting: int = 256
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    structured_backend: str = "guidance"  # vLLM's grammar engine: guidance (llguidance) | xgrammar
    svf: bool = True  # SVF experts served (False: W kept, no SVD; the SAPT bank alone)
    sapt_bank: int = 64  # the SAPT bank's width: total rank of the bundles loaded at once (0: none)
    max_experts: int = 256  # SVF experts kept on the GPU (LRU)
    skeleton: bool = True  # False: no host skeleton (a shape-only folder without weights: benchmarks)
    load_format: str = "auto"  # "dummy": random weights without reading any (benchmarks)
    detokenize: bool = True  # False: token ids only (models whose vocabulary exceeds the tokenizer's)
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> "VLLMOptions":
        """The options of ``spec`` (resolves the model folder: a GGUF file is converted once)."""
        folder, default_name = resolve_model_folder(spec.model.model, Path(spec.model.cache_dir))
        m = spec.model
        return spec_from(cls, spec.vllm, model=str(folder), served_name=m.served_model_name or default_name,
                         cache_dir=Path(m.cache_dir), dtype="bfloat16" if m.dtype == "auto" else m.dtype,
                         adapt_targets=m.adapt_targets, max_model_len=spec.max_model_len,
                         max_num_seqs=spec.max_num_seqs, max_waiting=spec.max_waiting)


@dataclass
class VLLMApi:
    """The vLLM classes requests are built from (replaced by stand-ins in tests without vLLM)."""

    SamplingParams: Any
    RequestOutputKind: Any
    StructuredOutputsParams: Any = None
    validate_structure: Any = None  # (vLLM SamplingParams) -> None or ValueError: the grammar backend's own check


def vllm_structure(api: "VLLMApi", st: Structure | None):
    """vLLM's StructuredOutputsParams of a structure (None: none)."""
    if st is None:
        return None
    if st.kind == "json_object":  # compact JSON, as the native engine writes it
        return api.StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    value = list(st.value) if st.kind == "choice" else st.value
    return api.StructuredOutputsParams(**{st.kind: value}, **({"disable_any_whitespace": True} if st.kind == "json"
                                                              else {}))


class VLLMGrammars:
    """engine.structured's Grammars, whose check also asks vLLM's grammar backend (a StructureError either way:
    a 400 at the edge, never a failed request inside vLLM)."""

    def __init__(self, grammars, api: "VLLMApi", capacity: int = 256):
        self.grammars, self.api = grammars, api
        # structures the backend took, as the compiler's cache keeps compiled ones (a refusal is not kept)
        self._ask_backend = functools.lru_cache(maxsize=capacity)(self._ask_backend)

    def check(self, st: Structure) -> None:
        self.grammars.check(st)
        if self.api.validate_structure is not None:
            self._ask_backend(st)

    async def check_async(self, st: Structure, limits) -> None:
        await self.grammars.check_async(st, limits)
        if self.api.validate_structure is not None:
            await asyncio.to_thread(self._ask_backend, st)

    def _ask_backend(self, st: Structure) -> None:
        from engine.structured import StructureError

        try:
            self.api.validate_structure(self.api.SamplingParams(structured_outputs=vllm_structure(self.api, st)))
        except ValueError as e:
            raise StructureError(str(e)) from None

    def __getattr__(self, name: str):
        return getattr(self.grammars, name)


def rows_config(options: VLLMOptions) -> RowsConfig | None:
    """The workers' per-row configuration, or None where nothing is adapted (stock vLLM)."""
    if options.adapt_targets == "none" or (not options.svf and not options.sapt_bank):
        return None
    svd = None if options.load_format == "dummy" else str(options.cache_dir / "svd")  # random weights: not kept
    targets = options.adapt_targets.split(",") if "," in options.adapt_targets else options.adapt_targets
    return RowsConfig(targets=targets, sapt_rank=options.sapt_bank, svd_cache=svd, svf=options.svf)


def connect_vllm(options: VLLMOptions) -> tuple[Any, VLLMApi]:
    """Start vLLM's AsyncLLM for ``options``. Called in a running loop, its output handler starts on that
    loop; called in a thread without one, on the loop of its first request (``VLLMEngine.boot``)."""
    rows = rows_config(options)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # this process runs threads: never fork it
    if rows is not None:
        if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:  # the runner the hooks are written against
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = os.environ[_SET_HERE] = "1"
        elif os.environ["VLLM_USE_V2_MODEL_RUNNER"] != "1":
            raise ValueError("per-row adaptation runs on vLLM's model runner V2: unset VLLM_USE_V2_MODEL_RUNNER=0")
    elif os.environ.pop(_SET_HERE, None):  # a stock engine after a rows engine in this process: vLLM's default
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    if importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import AsyncEngineArgs
    from vllm import SamplingParams as VSamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=options.model, tokenizer=options.model, served_model_name=options.served_name, dtype=options.dtype,
        seed=options.seed, max_model_len=options.max_model_len, max_num_seqs=options.max_num_seqs,
        tensor_parallel_size=options.tensor_parallel_size, gpu_memory_utilization=options.gpu_memory_utilization,
        enforce_eager=options.enforce_eager, load_format=options.load_format, enable_prefix_caching=True,
        worker_extension_cls=WORKER_EXTENSION if rows is not None else "", disable_log_stats=True,
        # compact JSON, as the native engine writes it: vLLM 0.25's grammar backends read this engine-wide
        # setting only, not the request's StructuredOutputsParams.disable_any_whitespace; with any whitespace
        # allowed, sampled rows ran out of tokens in runs of blanks (3 of 32 documents on the H200)
        structured_outputs_config=StructuredOutputsConfig(backend=options.structured_backend,
                                                          disable_any_whitespace=True),
        # the rows configuration travels to every worker inside vLLM's own config (``additional_config``, which
        # vLLM also folds into its compile-cache key: a rows engine never loads a graph compiled for another
        # layout, nor stock vLLM one compiled with the rows layers)
        additional_config={CONFIG_KEY: rows.to_config()} if rows is not None else {})
    # llguidance refuses some structures xgrammar takes: ask it at the edge
    validate = guidance_validator() if options.structured_backend == "guidance" else None
    return AsyncLLM.from_engine_args(args), VLLMApi(VSamplingParams, RequestOutputKind, StructuredOutputsParams,
                                                     validate)


def _eos_ids(model, tokenizer, folder: str) -> list[int]:
    if model is None:
        from transformers import AutoConfig

        model = SimpleNamespace(config=AutoConfig.from_pretrained(folder))
    return eos_ids(model, tokenizer)


def remove_stale_runs(root: Path) -> None:
    """Delete the scratch folders of engines whose process is gone (``run-<pid>-...``)."""
    for d in root.glob("run-*"):
        if not scratch_alive(d):
            shutil.rmtree(d, ignore_errors=True)


def vllm_logprobs(completion, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's logprobs of each generated token (the sampled token's, then the top k's) as ours: its flat
    lists (``SamplingParams.flat_logprobs``, one set of lists per output instead of a dict of objects per
    token), or its per-token {token id: Logprob(logprob, rank)}."""
    lps = completion.logprobs
    if k is None or lps is None:
        return None
    out = []
    if hasattr(lps, "start_indices"):
        # vllm.logprobs.FlatLogprobs: position i is entries start..end, the sampled token first, then the top ones
        # by rank 1, 2, ... (vllm/logprobs.py, append_logprobs_for_next_position): read as slices, no sorting
        ids, values, starts, ends = lps.token_ids, lps.logprobs, lps.start_indices, lps.end_indices
        for i, tok in enumerate(completion.token_ids):
            s = starts[i]
            e = min(ends[i], s + 1 + k)
            out.append(TokenLogprob(tok, values[s], list(zip(ids[s + 1:e], values[s + 1:e]))))
        return out
    for tok, entry in zip(completion.token_ids, lps):
        ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None))
        top = [(t, v) for r, t, v in ranked if r <= k][:k]
        out.append(TokenLogprob(tok, entry[tok].logprob, top))
    return out


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "abort") else "stop"


class VLLMEngine:
    def __init__(self, options: VLLMOptions, tokenizer, model=None,
                 connect: Callable[[VLLMOptions], tuple[Any, VLLMApi]] = connect_vllm,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.options = options
        self.tokenizer = tokenizer
        self._grammars = None
        self.model_name = options.served_name
        self.max_model_len = options.max_model_len
        self.max_waiting = options.max_waiting
        self.model = model  # the host skeleton (None without one)
        self.eos_token_ids = _eos_ids(model, tokenizer, options.model)
        self._connect = connect
        self.scratch = options.cache_dir / "vllm" / f"run-{os.getpid()}-{id(self):x}"
        # the loop that owns vLLM: a given one (a server's, running in another thread), or the engine thread's
        self._loop = loop or asyncio.new_event_loop()
        self._thread = None if loop else threading.Thread(target=self._run_loop, name="t2serve-vllm", daemon=True)
        self._booted = False
        self._tasks: dict[str, concurrent.futures.Future | asyncio.Task] = {}
        # admission, streams and their hand-off (front.pending: requests accepted and not yet finished)
        self.front = FrontEnd(options.max_model_len, lambda: self.max_waiting + options.max_num_seqs,
                              submit=self._submit, cancel=self._cancel, score_budget=SCORE_BUDGET)
        self._stopping = False
        self._dead: BaseException | None = None
        self._serving: set[asyncio.Task] = set()  # requests being served (engine loop)
        self.llm = self.api = None
        self.rows: RowRouter | None = None  # None: nothing adapted (stock vLLM)
        self.runtime: RowsView | None = None  # what the HTTP edge validates adaptations against
        self.rows_info: dict = {}

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: EngineSpec, loop: asyncio.AbstractEventLoop | None = None) -> "VLLMEngine":
        return cls.from_options(VLLMOptions.from_spec(spec), loop=loop)

    @classmethod
    def from_options(cls, options: VLLMOptions, connect=connect_vllm,
                     loop: asyncio.AbstractEventLoop | None = None) -> "VLLMEngine":
        """Load the host skeleton (unless ``options.skeleton`` is False), start vLLM, return when ready.
        ``loop``: a running loop of another thread that is to own vLLM (blocking: never call this on it)."""
        from transformers import AutoTokenizer

        t0 = time.time()
        tokenizer = AutoTokenizer.from_pretrained(options.model)
        model = load_skeleton(options.model, getattr(torch, options.dtype)) if options.skeleton else None
        engine = cls(options, tokenizer, model, connect, loop)
        try:
            engine.boot()
        except BaseException:
            engine.close(timeout=60)
            raise
        log.info("vLLM engine for %s up in %.1f s", options.model, time.time() - t0)
        return engine

    def boot(self, timeout: float | None = None) -> None:
        remove_stale_runs(self.scratch.parent)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._booted = True
        if self._thread is not None:
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("boot() blocks: call it off the event loop that is to own vLLM")
        # vLLM's start (a minute or two) happens here, so the given loop goes on serving meanwhile (health
        # checks); its output handler then starts on that loop
        self.llm, self.api = self._connect(self.options)
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _open(self) -> None:
        if self.llm is None:
            self.llm, self.api = self._connect(self.options)
        start_output_handler(self.llm)
        if rows_config(self.options) is None:
            return
        info = (await self._rpc("t2_rows_info", ()))[0]  # raises when the hooks did not install
        targets = [Target(n, "linear", o, i) for n, o, i in info["targets"]]
        self.rows = RowRouter(self._rpc, self.scratch / "rows", RowsView(targets, info["sapt_rank"], info["svf"]),
                              max_experts=self.options.max_experts)
        self.rows_info = info
        self.runtime = self.rows.view
        log.info("per-row adaptation: %d matrices, %d request slots, SAPT bank %d, tables %.1f MB, "
                 "factors %.1f MB", len(targets), info["rows"], info["sapt_rank"], info["table_bytes"] / 2**20,
                 info["factor_bytes"] / 2**20)

    async def _rpc(self, method: str, args: tuple) -> list:
        return await self.llm.collective_rpc(method, args=args)

    # --- lifecycle -----------------------------------------------------------------------------------
    adaptation = {"phase": "ready", "percent": 100.0}  # the workers prepare their layers before vLLM is up

    async def wait_adaptation(self, timeout: float) -> bool:
        return True

    def start(self) -> None:
        """Nothing to do: the engine runs from ``from_options`` on (the native engine starts here)."""

    @property
    def ready(self) -> bool:
        llm = self.llm
        return (self._booted and (self._thread is None or self._thread.is_alive()) and not self._loop.is_closed()
                and self._dead is None and not self._stopping and llm is not None
                and not getattr(llm, "errored", False))

    def stats(self) -> dict:
        rows = self.rows.stats() if self.rows is not None else {}
        return {"running": self.front.pending, "waiting": 0, "kv_tokens_used": 0, **rows}

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work, abort what is in flight, stop vLLM and the engine thread."""
        self._stopping = True
        await asyncio.to_thread(self.close, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop vLLM (blocking: off the loop that owns it)."""
        own = self._thread is not None
        if not self._booted or (own and not self._thread.is_alive()) or self._loop.is_closed():
            shutil.rmtree(self.scratch, ignore_errors=True)
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout)
        except Exception:
            log.exception("stopping vLLM failed")
        if own:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._booted = False
        shutil.rmtree(self.scratch, ignore_errors=True)

    async def _close(self) -> None:
        self._stopping = True
        tasks = list(self._serving)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.llm is not None:
            self.llm.shutdown()

    # --- requests ------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue ``request`` and return its stream of outputs; raises at once when it cannot be queued.

        Leaving the stream early (aclose, cancellation, client gone) aborts the request in vLLM."""
        if self._stopping or not self.ready:
            raise EngineDeadError("the engine is not running")
        return self.front.open(request)

    def _submit(self, request: GenerationRequest) -> None:
        if asyncio.get_running_loop() is self._loop:  # the loop that owns vLLM: served right here
            fut = self._loop.create_task(self._serve(request))
        else:
            fut = asyncio.run_coroutine_threadsafe(self._serve(request), self._loop)
        self._tasks[request.request_id] = fut

    def _cancel(self, request_id: str) -> None:
        fut = self._tasks.get(request_id)
        if fut is not None:
            fut.cancel()  # thread-safe for the futures of other loops, as for this loop's tasks

    async def abort(self, request_id: str) -> None:
        self.front.abort(request_id)

    def adapter_report(self, adaptation) -> dict:
        """How ``adaptation`` is served here (exactly, per row). Blocking: call it off the loop that owns vLLM."""
        return asyncio.run_coroutine_threadsafe(self._report(adaptation), self._loop).result()

    async def _report(self, adaptation) -> dict:
        self._check(adaptation)
        sapt = adaptation.sapt
        return {"label": adaptation.label, "svf": "rows" if adaptation.svf is not None else None,
                "sapt_rank": sapt.bundle.num_tasks * sapt.bundle.rank if sapt is not None else 0, "exact": True}

    def _check(self, adaptation) -> None:
        if self.rows is None:
            raise ValueError("this server adapts no matrices on vLLM (adapt_targets none, or SVF off and no SAPT "
                             "bank): only the base model is served")
        self.rows.check(adaptation)

    async def _serve(self, req: GenerationRequest) -> None:
        push = self.front.deliver
        n = len(req.prompt_ids)
        task = asyncio.current_task()
        self._serving.add(task)
        lease = None
        try:
            if req.adaptation is not None:
                self._check(req.adaptation)
                lease = await self.rows.acquire(req.adaptation)
            extra = {RECIPE_KEY: lease.recipe} if lease is not None else None
            salt = lease.salt if lease is not None else None  # prefixes are shared only under one adaptation
            if req.score is not None:
                push(await self._score(req, salt, extra))
            else:
                await self._generate(req, salt, push, extra)
        except asyncio.CancelledError:
            push(RequestOutput(req.request_id, [], "", True, "abort", prompt_tokens=n))
            raise
        except Exception as e:
            if not isinstance(e, (EngineError, ValueError)):
                log.exception("request %s failed", req.request_id)
            push(RequestOutput(req.request_id, [], "", True, "abort", prompt_tokens=n,
                               error=f"{type(e).__name__}: {e}"))
        finally:
            self._serving.discard(task)
            self._tasks.pop(req.request_id, None)
            self.front.release()
            if lease is not None:
                await self.rows.release(lease)

    def _prompt(self, ids: list[int], salt: str | None) -> dict:
        prompt: dict = {"type": "token", "prompt_token_ids": list(ids)}  # vLLM's TokensInput: no re-rendering
        if salt is not None:  # blocks computed under one adaptation are never reused under another
            prompt["cache_salt"] = salt
        return prompt

    def sampling_params(self, p: SamplingParams, extra_args: dict | None = None):
        return self.api.SamplingParams(
            extra_args=extra_args,
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0),
            seed=p.seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None, min_p=p.min_p,
            min_tokens=p.min_tokens, logprobs=p.logprobs, flat_logprobs=p.logprobs is not None,
            detokenize=self.options.detokenize,
            skip_special_tokens=p.skip_special_tokens, include_stop_str_in_output=p.include_stop_str_in_output,
            structured_outputs=vllm_structure(self.api, p.structure),
            output_kind=self.api.RequestOutputKind.DELTA)

    @property
    def grammars(self) -> "VLLMGrammars":
        """Structured outputs' check at the edge: before vLLM sees a structure, it must compile with this
        engine's compiler (engine.structured) and pass vLLM's grammar backend's own check."""
        if self._grammars is None:
            from engine.structured import Grammars

            self._grammars = VLLMGrammars(Grammars.shared(self.tokenizer, len(self.tokenizer)), self.api)
        return self._grammars

    async def _generate(self, req: GenerationRequest, salt, push, extra: dict | None = None) -> None:
        n, count = len(req.prompt_ids), 0
        async for o in self.llm.generate(self._prompt(req.prompt_ids, salt), self.sampling_params(req.params, extra),
                                         req.request_id):
            c = o.outputs[0]
            count += len(c.token_ids)
            reason = _finish_reason(c.finish_reason) if o.finished else None
            push(RequestOutput(req.request_id, list(c.token_ids), c.text or "", o.finished, reason,
                               prompt_tokens=n, completion_tokens=count,
                               logprobs=vllm_logprobs(c, req.params.logprobs),
                               stop_reason=c.stop_reason if o.finished else None))
            if o.finished:
                return
        raise EngineError("vLLM ended the request without finishing it")

    async def _score(self, req: GenerationRequest, salt, extra: dict | None = None) -> RequestOutput:
        k = req.score.prompt_logprobs
        params = self.api.SamplingParams(n=1, max_tokens=1, temperature=0.0, prompt_logprobs=k or 0, detokenize=False,
                                         output_kind=self.api.RequestOutputKind.FINAL_ONLY, extra_args=extra)

        raw: dict[int, Any] = {}

        async def one(j: int, ids: list[int]) -> list[float | None]:
            last = None
            async for o in self.llm.generate(self._prompt(ids, salt), params, f"{req.request_id}#score{j}"):
                last = o
            if last is None:
                raise EngineError("vLLM returned nothing for a score request")
            if j == 0 and k is not None:
                raw[0] = last.prompt_logprobs
            return token_logprobs(last.prompt_logprobs, ids)

        prompts = score_prompts(req.prompt_ids, req.score)
        logprobs = await asyncio.gather(*(one(j, ids) for j, ids in enumerate(prompts)))
        out = RequestOutput(req.request_id, [], "", True, "stop", prompt_tokens=len(req.prompt_ids))
        out.scores = score_result(req.prompt_ids, req.score, logprobs)
        if k is not None:
            out.scores.prompt_logprobs = prompt_token_logprobs(raw[0], req.prompt_ids, k)
        return out
