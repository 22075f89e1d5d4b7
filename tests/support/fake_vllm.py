"""A stand-in for vLLM's AsyncLLM on the CPU, so the vLLM engine's own logic runs without vLLM.

A Hugging Face model (its own copy, as vLLM holds its own weights) is decoded greedily without a KV cache.
Its adapted ``nn.Linear`` layers are turned into row-adapted layers by the real ``WorkerRows.install``, and
the worker RPCs go through the real worker extension (``RowsExtension``); the fake then plays vLLM's
runner: ``max_num_seqs`` request slots, a request waits for a free one, its slot's row is written from its
recipe when it gets one, and requests decode one token per turn, interleaved, each step mapping its tokens
to its own slot. With nothing adapted (``rows_config`` None) it decodes the plain model. It records what it
was asked.
"""
from __future__ import annotations

import asyncio
import types
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.targets import find_targets
from engine.vllm.engine import VLLMApi, rows_config
from engine.vllm.rows import RECIPE_KEY
from engine.vllm.rows_worker import Sub, WorkerRows
from engine.vllm.worker import RowsExtension


class Params(SimpleNamespace):
    """Takes whatever vLLM's SamplingParams takes."""


API = VLLMApi(Params, SimpleNamespace(DELTA="delta", FINAL_ONLY="final"), Params)


class FakeWorker(RowsExtension):
    def __init__(self, model):
        self._model = model

    def get_model(self):
        return self._model


class FakeLLM:
    def __init__(self, options):
        self.options = options
        self.model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(options.model)  # texts as vLLM's detokenizer gives them
        self.worker = FakeWorker(self.model)
        self.errored = False
        self.in_flight = 0  # generate() calls not yet exhausted
        self.rpcs: list[str] = []
        self.requests: list[dict] = []  # what each generate() was asked
        self.shut = False
        self.rows = None
        config = rows_config(options)
        if config is not None:
            self._install_rows(config)

    # --- rows mode: the runner's request slots -------------------------------------------------------------
    def _install_rows(self, config) -> None:
        found = [(self.model.get_submodule(t.name), [Sub(t.name, None, slice(None))], [t.name])
                 for t in find_targets(self.model, config.targets)]
        self.rows = WorkerRows.install(found, config, self.options.max_num_seqs, self.options.max_model_len + 8)
        for layer, _, _ in self.rows.layers:
            layer.forward = types.MethodType(_rows_forward, layer)
        self.worker.model_runner = SimpleNamespace(t2_rows=self.rows)
        self.free_slots = list(range(self.options.max_num_seqs))
        self.slot_freed = asyncio.Event()
        self.slots_used: list[tuple[str, int]] = []  # (request id, slot), in admission order
        self.waited = 0  # requests that found every slot taken
        self.events: list[tuple[str, str]] = []  # ("start" | "end", request id) as slots are taken and freed
        self.peak_slots = 0

    async def _take_slot(self) -> int:
        waited = False
        while not self.free_slots:
            waited = True
            self.slot_freed.clear()
            await self.slot_freed.wait()
        self.waited += waited
        slot = self.free_slots.pop(0)
        self.peak_slots = max(self.peak_slots, self.options.max_num_seqs - len(self.free_slots))
        return slot

    def _free_slot(self, slot: int) -> None:
        self.free_slots.append(slot)
        self.slot_freed.set()

    async def _generate_rows(self, ids, params, request_id):
        recipe = (getattr(params, "extra_args", None) or {}).get(RECIPE_KEY)
        slot = await self._take_slot()
        self.slots_used.append((request_id, slot))
        self.events.append(("start", request_id))
        try:
            self.rows.tables.admit(slot, recipe)  # what vLLM's runner does when it first schedules the request
            with torch.no_grad():
                if getattr(params, "prompt_logprobs", None) is not None:
                    self._map(slot, len(ids))
                    yield self._out([], "length", True, self._prompt_logprobs(ids))
                    return
                seq = list(ids)
                text = ""
                eos = self.model.generation_config.eos_token_id
                eos = set(eos if isinstance(eos, list) else [eos]) - {None}
                for i in range(params.max_tokens):
                    self._map(slot, len(seq))
                    t = int(self.model(torch.tensor([seq])).logits[0, -1].argmax())
                    seq.append(t)
                    last = i == params.max_tokens - 1 or (not getattr(params, "ignore_eos", False) and t in eos)
                    full = self.tokenizer.decode(seq[len(ids):], skip_special_tokens=True)
                    delta, text = full[len(text):], full  # the text each step adds, as vLLM streams it
                    yield self._out([t], ("length" if i == params.max_tokens - 1 else "stop") if last else None,
                                    last, None, delta)
                    if last:
                        return
                    await asyncio.sleep(0)  # other requests step in between, on their own slots
        finally:
            self.events.append(("end", request_id))
            self._free_slot(slot)

    def _map(self, slot: int, n: int) -> None:
        self.rows.tables.map_tokens(np.array([slot]), np.array([n]), n)

    # --- the AsyncLLM surface the engine uses ----------------------------------------------------------
    async def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):
        self.rpcs.append(method)
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def shutdown(self) -> None:
        self.shut = True

    async def generate(self, prompt, params, request_id):
        ids = list(prompt["prompt_token_ids"])
        self.requests.append({"id": request_id, "ids": ids, "salt": prompt.get("cache_salt"), "params": params})
        self.in_flight += 1
        try:
            if self.rows is not None:
                async for out in self._generate_rows(ids, params, request_id):
                    yield out
                return
            with torch.no_grad():
                plp = self._prompt_logprobs(ids) if getattr(params, "prompt_logprobs", None) is not None else None
                tokens, reason = self._decode(ids, params)
            if params.output_kind == "final":
                yield self._out(tokens, reason, True, plp)
                return
            for i, t in enumerate(tokens):
                last = i == len(tokens) - 1
                yield self._out([t], reason if last else None, last, plp if i == 0 else None)
        finally:
            self.in_flight -= 1

    # --- internals ---------------------------------------------------------------------------------------
    def _prompt_logprobs(self, ids):
        lp = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (L, V)
        return [None] + [{t: SimpleNamespace(logprob=float(lp[i - 1, t]))} for i, t in enumerate(ids) if i > 0]

    def _decode(self, ids, params):
        if params.temperature != 0:
            raise NotImplementedError("the fake decodes greedily only")
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        seq, out = list(ids), []
        for _ in range(params.max_tokens):
            t = int(self.model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if not getattr(params, "ignore_eos", False) and t in eos:
                return out, "stop"
        return out, "length"

    def _out(self, tokens, reason, finished, plp, text=""):
        done = SimpleNamespace(token_ids=list(tokens), text=text, finish_reason=reason, stop_reason=None, logprobs=None)
        return SimpleNamespace(outputs=[done], finished=finished, prompt_logprobs=plp)


def _rows_forward(self, x):
    """A row-adapted ``nn.Linear`` on (batch, tokens, in) inputs: the row math takes one row per token."""
    y = self.quant_method.apply(self, x.reshape(-1, x.shape[-1]), self.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fake_connect(options):
    return FakeLLM(options), API
