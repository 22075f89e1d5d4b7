"""A stand-in for vLLM's AsyncLLM on the CPU, so the vLLM engine's own logic runs without vLLM.

A Hugging Face model (its own copy, as vLLM holds its own weights) is decoded greedily without a KV
cache; LoRA adapters are read from their PEFT folders and applied as W + B A for the request; weight
swaps go through the real worker extension (``WeightSwapExtension``) on that model. It records what it
was asked, and whether a swap ever happened while a request was in flight.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from engine.vllm.engine import VLLMApi
from engine.vllm.peft_folder import read_peft_adapter
from engine.vllm.worker import WeightSwapExtension


class Params(SimpleNamespace):
    """Takes whatever vLLM's SamplingParams takes."""


class LoRARequest(SimpleNamespace):
    pass


API = VLLMApi(Params, LoRARequest, SimpleNamespace(DELTA="delta", FINAL_ONLY="final"))


class FakeWorker(WeightSwapExtension):
    def __init__(self, model):
        self._model = model

    def get_model(self):
        return self._model


class FakeLLM:
    def __init__(self, options):
        self.options = options
        self.model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32).eval()
        self.worker = FakeWorker(self.model)
        self.errored = False
        self.registered: dict[int, str] = {}  # lora id -> folder
        self.removed: list[int] = []
        self.in_flight = 0  # generate() calls not yet exhausted
        self.swaps_in_flight = 0  # swaps that found a request in flight (must stay 0)
        self.rpcs: list[str] = []
        self.requests: list[dict] = []  # what each generate() was asked
        self.prefix_resets = 0
        self.shut = False

    # --- the AsyncLLM surface the engine uses ----------------------------------------------------------
    async def add_lora(self, req) -> bool:
        config, _ = read_peft_adapter(req.lora_path)
        if config["r"] > self.options.lora_max_rank:
            raise ValueError(f"LoRA rank {config['r']} is greater than max_lora_rank")
        self.registered[req.lora_int_id] = req.lora_path
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return self.registered.pop(lora_id, None) is not None

    async def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):
        self.rpcs.append(method)
        if self.in_flight:
            self.swaps_in_flight += 1
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    async def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    def shutdown(self) -> None:
        self.shut = True

    async def generate(self, prompt, params, request_id, lora_request=None):
        ids = list(prompt["prompt_token_ids"])
        self.requests.append({"id": request_id, "ids": ids, "lora": lora_request, "salt": prompt.get("cache_salt"),
                              "params": params})
        self.in_flight += 1
        try:
            with torch.no_grad(), self._lora(lora_request):  # all compute at once: adapters never interleave
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
    @contextlib.contextmanager
    def _lora(self, req):
        if req is None:
            yield
            return
        assert req.lora_int_id in self.registered, "an adapter was used before it was registered"
        _, loras = read_peft_adapter(req.lora_path)
        modules = dict(self.model.named_modules())
        saved = {n: modules[n].weight.detach().clone() for n in loras}
        for n, f in loras.items():
            modules[n].weight.data += (f.B.double() @ f.A.double()).to(torch.float32)
        try:
            yield
        finally:
            for n, w in saved.items():
                modules[n].weight.data.copy_(w)

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

    def _out(self, tokens, reason, finished, plp):
        done = SimpleNamespace(token_ids=list(tokens), text="", finish_reason=reason)
        return SimpleNamespace(outputs=[done], finished=finished, prompt_logprobs=plp)


def fake_connect(options):
    return FakeLLM(options), API
