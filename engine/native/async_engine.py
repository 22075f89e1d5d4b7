"""The asyncio-facing engine. A dedicated thread owns the model and runs the step loop; the event loop
only enqueues requests and receives outputs, so no model compute ever runs on the event-loop thread.
Admission, streams and their hand-off are the shared front end's (``engine.frontend``); this backend
submits, aborts and reports.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator

from adapters.install import install_factors
from adapters.runtime import AdaptationRuntime
from adapters.svd_cache import load_or_compute
from adapters.targets import find_targets
from engine.contract import EngineDeadError, GenerationRequest, RequestOutput
from engine.frontend import FrontEnd
from engine.loader import install_adapters, load_model, target_spec
from engine.native.llm_engine import EngineConfig, LLMEngine
from engine.spec import EngineSpec

log = logging.getLogger("t2serve.engine")


class AsyncEngine:
    @property
    def grammars(self):
        """Structured outputs' compiler of this engine's tokenizer (engine.structured), built on first use."""
        return self.llm.grammars

    def __init__(self, llm: LLMEngine, model_name: str, max_waiting: int = 256):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_model_len = llm.config.max_model_len
        self.eos_token_ids = llm.eos_token_ids
        self.max_waiting = max_waiting
        self.runtime = llm.runner.adapt  # the adaptation runtime (validates and plans adaptations)
        self.model = llm.model  # the base model (engine.factory.Engine)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", req) | ("abort", id) | ("install", ...)
        self._wake = threading.Event()
        # front.pending: requests accepted but not yet running (inbox + engine waiting queue); room for
        # max_waiting of them beyond the free slots
        self.front = FrontEnd(self.max_model_len, self._capacity, submit=self._submit, cancel=self._cancel)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: BaseException | None = None
        self._stats: dict = llm.stats()
        self._to_prepare = None  # (targets, SVD cache folder): the adaptive layers still to prepare
        self._deferred: list[GenerationRequest] = []  # adapted requests waiting for the adaptive layers
        self.adaptation: dict = {"phase": "ready" if self._adaptive_ready else "waiting", "percent": 100.0}

    @classmethod
    def from_spec(cls, spec: EngineSpec, adapt=None, background: bool = True) -> "AsyncEngine":
        """Load ``spec.model``; its adaptive layers are prepared in the background once the engine starts
        (``background``; else before returning), unless ``adapt`` is given. Until they are in, base requests
        are served and adapted ones wait in the engine (``adaptation`` says how far the preparation is)."""
        loaded = load_model(spec.model)
        pending = None
        if adapt is None:
            if background and spec.model.adapt_targets != "none":
                found = find_targets(loaded.model, target_spec(spec.model.adapt_targets))
                adapt = AdaptationRuntime(loaded.model, expected=found)
                pending = (found, Path(spec.model.cache_dir) / "svd")
            else:
                adapt = install_adapters(loaded.model, spec.model.adapt_targets, spec.model.cache_dir)
        cfg = EngineConfig(max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
                           max_prefill_tokens=spec.max_prefill_tokens, grammar_mask_ms=spec.grammar_mask_ms)
        eng = cls(LLMEngine(loaded.model, loaded.tokenizer, cfg, adapt), loaded.name, spec.max_waiting)
        eng.loaded = loaded
        eng._to_prepare = pending
        return eng

    # --- the adaptive layers, prepared in the background ------------------------------------------------
    def _prepare_adaptation(self, found, svd_dir: Path) -> None:
        """SVD factors of ``found`` (from the cache, or computed), then handed to the engine thread, which
        installs the layers between two steps."""
        t0 = time.time()
        self.adaptation = {"phase": "svd", "percent": 0.0, "matrices": len(found)}

        def progress(done: int, total: int) -> None:
            elapsed = time.time() - t0
            self.adaptation = {"phase": "svd", "percent": round(100 * done / total, 1), "matrices": total,
                               "eta_s": round(elapsed / done * (total - done), 1)}
            if done == total or done % max(1, total // 10) == 0:
                log.info("SVD of the adapted matrices: %d/%d (%.0f s)", done, total, time.time() - t0)

        try:
            factors = load_or_compute(self.model, found, svd_dir, progress=False, on_progress=progress)
        except Exception as e:
            log.exception("preparing the adaptive layers failed: adapted requests cannot be served")
            self.adaptation = {"phase": "failed", "error": f"{type(e).__name__}: {e}"}
            self._inbox.put(("install", None))
            self._wake.set()
            return
        self._inbox.put(("install", (found, factors, time.time() - t0)))
        self._wake.set()

    def _install(self, item) -> None:
        """In the engine thread, between steps: the layers in, then the adapted requests that waited."""
        if item is not None:
            found, factors, seconds = item
            install_factors(self.model, found, factors)
            self.runtime.scan()
            self.llm.runner.invalidate()
            self.adaptation = {"phase": "ready", "percent": 100.0, "matrices": len(found),
                               "seconds": round(seconds, 1)}
            log.info("adaptive layers installed on %d matrices (%.1f s): adapted requests are served", len(found),
                     seconds)
        deferred, self._deferred = self._deferred, []
        for req in deferred:
            self._add(req)

    async def wait_adaptation(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the adaptive layers; whether they are in."""
        deadline = time.monotonic() + timeout
        while not self._adaptive_ready and self.adaptation.get("phase") != "failed":
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.2, left))
        return self._adaptive_ready

    @property
    def _adaptive_ready(self) -> bool:
        return self.runtime is None or self.runtime.ready

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="t2serve-engine", daemon=True)
            self._thread.start()
            if self._to_prepare is not None:
                threading.Thread(target=self._prepare_adaptation, args=self._to_prepare, name="t2serve-svd",
                                 daemon=True).start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking work; abort whatever is still in flight; join the engine thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def stats(self) -> dict:
        # Waiting = accepted and not yet running (in the inbox or the engine's queue); the inbox also
        # carries aborts, which are not requests.
        return {**self._stats, "waiting": self.front.pending}

    # --- requests -----------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue `request` and return its stream of outputs. Raises at once when it cannot be queued.

        Leaving the stream early (aclose, cancellation, client gone) aborts the request and frees its slot.
        """
        if self._dead is not None or self._stop:
            raise EngineDeadError("the engine is not running")
        return self.front.open(request)

    async def abort(self, request_id: str) -> None:
        self.front.abort(request_id)

    def _capacity(self) -> int:
        return self.max_waiting + max(0, self.llm.config.max_num_seqs - self._stats.get("running", 0))

    def _submit(self, request: GenerationRequest) -> None:
        self._inbox.put(("add", request))
        self._wake.set()

    def _cancel(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # --- the engine thread ----------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        self.front.deliver(out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if item.adaptation is not None and not self._adaptive_ready:
                    if self.adaptation.get("phase") == "failed":
                        self.front.release()
                        self._deliver(RequestOutput(item.request_id, [], "", True, "abort",
                                                    error=f"adaptive layers unavailable: {self.adaptation['error']}"))
                    else:
                        self._deferred.append(item)  # served once the layers are in
                    continue
                self._add(item)
            elif kind == "install":
                self._install(item)
            elif any(r.request_id == item for r in self._deferred):
                self._deferred = [r for r in self._deferred if r.request_id != item]
                self.front.release()
                self._deliver(RequestOutput(item, [], "", True, "abort"))
            else:
                seq = self.llm._by_id.get(item)
                out = self.llm.abort(item)
                if out is not None:
                    if seq is not None and seq.num_cached == 0:  # never got to run
                        self.front.release()
                    self._deliver(out)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.llm.has_work:
                    self._stats = self.llm.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                waiting_before = len(self.llm.scheduler.waiting)
                try:
                    outs = self.llm.step()
                except Exception as e:  # fail the requests of this step, keep serving the others
                    log.exception("engine step failed")
                    outs = self._fail_running(e)
                admitted = waiting_before - len(self.llm.scheduler.waiting)
                if admitted:
                    self.front.release(admitted)
                self._stats = self.llm.stats()  # before delivery, so a client that sees its end sees the slot free
                for out in outs:
                    self._deliver(out)
        except BaseException as e:  # pragma: no cover - last resort
            self._dead = e
            log.exception("engine loop died")
        finally:
            for rid in list(self.llm._by_id):
                out = self.llm.abort(rid)
                if out is not None:
                    self._deliver(out)
            self._stats = self.llm.stats()

    def _add(self, item: GenerationRequest) -> None:
        try:
            self.llm.add_request(item)
        except Exception as e:  # validated before queueing; this is a last line of defence
            self.front.release()
            self._deliver(RequestOutput(item.request_id, [], "", True, "abort", error=str(e)))

    def _fail_running(self, err: Exception) -> list[RequestOutput]:
        outs = []
        for seq in list(self.llm.scheduler.running):
            out = self.llm.abort(seq.request_id)
            if out is not None:
                out.error = f"internal error: {type(err).__name__}"
                outs.append(out)
        return outs
