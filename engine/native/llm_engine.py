"""The synchronous engine: one step = admit -> prefill newcomers -> decode everyone -> postprocess.

Sequences join at token boundaries (a newcomer is prefilled and then decodes in the same step as the
others) and leave at token boundaries (their slot is freed as soon as their last token is sampled).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from adapters import AdaptationRuntime
from engine.contract import (
    FinishReason,
    GenerationRequest,
    PromptTooLongError,
    RequestOutput,
    ScoreResult,
    TokenLogprob,
)
from engine.loader import eos_ids
from engine.native.kv_cache import SlotKVCache
from engine.native.prefix_cache import PrefixCache
from engine.native.runner import ModelRunner
from engine.native.sampling import FAILED, process_logits, sample, unusable_rows
from engine.native.scheduler import Scheduler
from engine.native.sequence import Detokenizer, Sequence

log = logging.getLogger("t2serve.engine")
TTFT_SAMPLES = 4096
NON_FINITE = ("the model produced non-finite logits (NaN or infinity) for this request under its adaptation; "
              "the request was stopped, others were not affected")
TOO_COSTLY = ("the structure's grammar took longer than {ms:g} ms to decide this request's next tokens, twice in a "
              "row or once five times over (an ambiguous grammar's cost grows with its text); the request was "
              "stopped, others were not affected: simplify the grammar")
DEAD_END = ("the structure allows no token of this model at this point (the grammar engine found no way on); "
            "the request was stopped, others were not affected")


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_prefill_tokens: int = 2048
    admit_batch: int | None = None  # free slots to wait for before a prefill joins a decoding batch (None: auto)
    admit_max_delay: int = 4  # steps a waiting request may be held back for that
    prefix_cache_entries: int = 16  # shared-prefix KV entries kept (see prefix_cache.py)
    grammar_mask_ms: float | None = 20.0  # a row whose grammar takes longer per step, twice running, ends alone

    def resolved_admit_batch(self) -> int:
        return self.admit_batch if self.admit_batch is not None else max(1, self.max_num_seqs // 8)


@dataclass
class EngineCounters:
    steps: int = 0
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0  # requests ended alone with an error (non-finite logits)
    # The most recent times to first token (bounded: one sample per request would grow without end).
    ttft_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=TTFT_SAMPLES))


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config (Llama, Mistral, Qwen2 and relatives)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, adapt: AdaptationRuntime | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        layers, kv_heads, head_dim = kv_geometry(model.config)
        self.cache = SlotKVCache(layers, config.max_num_seqs, kv_heads, head_dim, config.max_model_len,
                                 dtype, self.device)
        self.runner = ModelRunner(model, self.cache, adapt)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_prefill_tokens, self.cache.move,
                                   config.resolved_admit_batch(), config.admit_max_delay)
        self.prefix_cache = PrefixCache(config.prefix_cache_entries)
        self.eos_token_ids = eos_ids(model, tokenizer)
        self._grammars = None
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.counters = EngineCounters()
        self._by_id: dict[str, Sequence] = {}

    # --- requests ---------------------------------------------------------------------------------
    @property
    def grammars(self):
        """The structured-output compiler of this engine's tokenizer (built on first use)."""
        if self._grammars is None:
            from engine.structured import Grammars

            self._grammars = Grammars.shared(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammars

    def add_request(self, req: GenerationRequest) -> None:
        p = req.params
        if not req.prompt_ids:
            raise PromptTooLongError("the prompt is empty")
        budget = 0 if req.score is not None else p.max_tokens  # score requests generate nothing
        if not 0 <= req.prefix_len < len(req.prompt_ids):
            raise PromptTooLongError(f"prefix_len {req.prefix_len} must be below the prompt length")
        if req.score is not None and req.score.continuation_start is not None and not (
                req.prefix_len < req.score.continuation_start <= len(req.prompt_ids)):
            raise PromptTooLongError("continuation_start must lie after the shared prefix, inside the prompt")
        if len(req.prompt_ids) + budget > self.config.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                f"model length ({self.config.max_model_len})")
        gen = None
        if p.seed is not None and not p.greedy:
            gen = torch.Generator(device=self.device).manual_seed(p.seed)
        seq = Sequence(req.request_id, list(req.prompt_ids), p, req.adaptation,
                       Detokenizer(self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens),
                       generator=gen, score=req.score,
                       prefix_len=req.prefix_len, priority=req.priority)
        if p.structure is not None and req.score is None:
            seq.matcher = self.grammars.matcher(p.structure)  # StructureError: a bad structure, refused here
        self._by_id[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        self.counters.aborted += 1
        return self._output(seq, [], "", "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> dict:
        running = self.scheduler.running
        return {"running": len(running), "waiting": len(self.scheduler.waiting),
                "kv_tokens_used": sum(s.num_cached for s in running),
                "kv_capacity_tokens": self.cache.capacity * self.cache.max_slots,
                "kv_bytes": self.cache.nbytes(), "steps": self.counters.steps}

    # --- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        new = self.scheduler.admit()
        if new:
            outputs += self._prefill(new)
        running = list(self.scheduler.running)
        if running:
            outputs += self._decode(running)
        self.counters.steps += 1
        return outputs

    def _reuse_prefixes(self, seqs: list[Sequence]) -> list[int]:
        """Copy cached prefix KV into the slots of `seqs`; the position each one's prefill starts at."""
        starts = []
        for s in seqs:
            P = s.prefix_len
            entry = self.prefix_cache.get(PrefixCache.key(s.prompt_ids[:P], s.adaptation)) if P else None
            if entry is not None:
                self.cache.write_prefix(s.slot, *entry)
            starts.append(P if entry is not None else 0)
        return starts

    def _prefill(self, seqs: list[Sequence]) -> list[RequestOutput]:
        starts = self._reuse_prefixes(seqs)
        rem = [len(s.prompt_ids) - st for s, st in zip(seqs, starts)]  # tokens to compute per row
        ids = torch.zeros(len(seqs), max(rem), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : rem[i]] = torch.tensor(s.prompt_ids[starts[i]:])
        scoring = any(s.score is not None and (s.score.continuation_start is not None
                                               or s.score.prompt_logprobs is not None) for s in seqs)
        logits = self.runner.forward(seqs[0].slot, ids, starts, [r - 1 for r in rem],
                                     [s.adaptation for s in seqs], return_hidden=scoring)
        logits, hidden = logits if scoring else (logits, None)
        for s, st in zip(seqs, starts):
            s.num_cached = len(s.prompt_ids)
            if s.prefix_len and st == 0:  # computed now: keep it for the next request with this prefix
                self.prefix_cache.put(PrefixCache.key(s.prompt_ids[: s.prefix_len], s.adaptation),
                                      *self.cache.read_prefix(s.slot, s.prefix_len))
        outs = []
        gen = [i for i, s in enumerate(seqs) if s.score is None]
        unusable = unusable_rows(logits).tolist()
        for i, s in enumerate(seqs):
            if s.score is not None:
                if unusable[i]:
                    outs.append(self._fail(s, NON_FINITE))
                else:
                    outs.append(self._finish_score(s, logits[i], None if hidden is None else hidden[i], starts[i]))
        if gen:
            outs += self._postprocess([seqs[i] for i in gen], logits[gen])
        return outs

    def _finish_score(self, s: Sequence, logits: torch.Tensor, hidden: torch.Tensor | None, start: int):
        """Answer a score request from its prefill: next-token log-probs and the continuation's log-likelihood."""
        spec = s.score
        logp = logits.log_softmax(-1)
        result = ScoreResult([float(logp[t]) for t in spec.next_token_ids])
        cs = spec.continuation_start
        if cs is not None and cs < len(s.prompt_ids):
            # hidden[j] (the state at position start + j) predicts prompt[start + j + 1].
            h = hidden[cs - 1 - start : len(s.prompt_ids) - 1 - start]
            targets = torch.tensor(s.prompt_ids[cs:], device=h.device)
            result.continuation_logprob = float(self.runner.token_logprobs(h, targets).sum())
            result.continuation_tokens = len(targets)
        if spec.prompt_logprobs is not None:
            if start:
                raise ValueError("prompt log-probabilities need the whole prompt computed (no shared prefix)")
            n = len(s.prompt_ids)
            targets = torch.tensor(s.prompt_ids[1:], device=hidden.device)
            lp, vals, ids = self.runner.prompt_logprobs(hidden[: n - 1], targets, spec.prompt_logprobs)
            lp, vals, ids = lp.tolist(), vals.tolist(), ids.tolist()
            result.prompt_logprobs = [None] + [TokenLogprob(t, lp[j], list(zip(ids[j], vals[j])))
                                               for j, t in enumerate(s.prompt_ids[1:])]
        out = self._retire(s, "stop")
        out.scores = result
        return out

    def _decode(self, seqs: list[Sequence]) -> list[RequestOutput]:
        ids = torch.tensor([[s.last_token] for s in seqs])
        logits = self.runner.forward(0, ids, [s.num_cached for s in seqs], [0] * len(seqs),
                                     [s.adaptation for s in seqs])
        for s in seqs:
            s.num_cached += 1
        return self._postprocess(seqs, logits)

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample every row, then advance each sequence. A row that cannot be sampled (non-finite logits,
        e.g. from its adaptation) ends its own request with an error; the other rows go on."""
        ps = [s.params for s in seqs]
        dev = logits.device
        raw = logits
        processed = [(i, s.params, s.prompt_ids, s.output_ids, self._ends(s.params))
                     for i, s in enumerate(seqs) if s.params.processed]
        if processed:  # penalties, biases, min_tokens: only these rows change
            logits = process_logits(logits, processed)
        structured = [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]
        too_costly: set[int] = set()
        if structured:  # structured outputs: only the tokens that keep each such row inside its grammar
            if logits is raw:
                logits = logits.float().clone()
            budget = self.config.grammar_mask_ms
            slow = dict(self.grammars.mask(logits, structured,
                                          [i for i, s in enumerate(seqs) if s.matcher is not None
                                           and s.params.structure.kind in ("json", "json_object")],
                                          None if budget is None else budget / 1000))
            for i, _ in structured:
                seq = seqs[i]
                seq.mask_strikes = seq.mask_strikes + (2 if slow[i] > 5 * budget / 1000 else 1) if i in slow else 0
                if seq.mask_strikes >= 2:  # twice running (or once, far over): the grammar itself, not the host
                    too_costly.add(i)
        if all(p.greedy for p in ps):  # the common case: no per-row parameter tensors to build
            tokens = torch.where(unusable_rows(logits), FAILED, logits.argmax(dim=-1)).tolist()
        else:
            tokens = sample(
                logits,
                torch.tensor([p.temperature for p in ps], device=dev),
                torch.tensor([p.top_k for p in ps], device=dev),
                torch.tensor([p.top_p for p in ps], device=dev),
                [s.generator for s in seqs],
                torch.tensor([p.min_p for p in ps], device=dev) if any(p.min_p for p in ps) else None,
            ).tolist()
        now = time.monotonic()
        outs = []
        logprobs = self._logprobs(seqs, raw, tokens)
        for i, (s, tok) in enumerate(zip(seqs, tokens)):
            if i in too_costly:
                outs.append(self._fail(s, TOO_COSTLY.format(ms=self.config.grammar_mask_ms), bad_request=True,
                                       code="structure_too_costly"))
                continue
            if tok == FAILED:
                if s.matcher is not None and bool(torch.isfinite(raw[i].max())):  # the model was fine: the mask
                    outs.append(self._fail(s, DEAD_END, bad_request=True))
                else:
                    outs.append(self._fail(s, NON_FINITE))
                continue
            if s.matcher is not None and not s.matcher.accept_token(tok):
                outs.append(self._fail(s, "the grammar engine refused the sampled token"))
                continue
            s.output_ids.append(tok)
            if i in logprobs:
                s.token_logprobs.append(logprobs[i])
            self.counters.generated_tokens += 1
            if s.first_token_at is None:
                s.first_token_at = now
                self.counters.ttft_seconds.append(now - s.arrival)
            reason = None
            if tok in s.params.stop_token_ids:
                reason, s.stop_reason, text = "stop", tok, ""
            elif not s.params.ignore_eos and tok in self.eos_token_ids:
                reason, text = "stop", ""
            elif s.matcher is not None and s.matcher.is_terminated():  # the structure is complete
                reason, text = "stop", s.detok.push(s.output_ids)[0]
            else:
                text, hit = s.detok.push(s.output_ids)
                if hit:
                    reason, s.stop_reason = "stop", s.detok.stop_hit
                elif len(s.output_ids) >= s.params.max_tokens or s.total_len >= self.config.max_model_len:
                    reason = "length"
            if reason is not None:
                text += s.detok.flush()
                self._by_id.pop(s.request_id, None)
                self.scheduler.finish(s)
                self.counters.finished += 1
            outs.append(self._output(s, s.output_ids[s.sent_tokens:], text, reason))
            s.sent_tokens = len(s.output_ids)
        return outs

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> dict[int, TokenLogprob]:
        """Row -> its token's log-probability under the model's own logits, and the top alternatives (for
        the rows that asked; one log-softmax over those rows)."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] != FAILED]
        if not rows:
            return {}
        lp = (logits if len(rows) == len(seqs) else logits[rows]).float().log_softmax(dim=-1)
        k = max(seqs[i].params.logprobs for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device))
        # one copy to the host for all three (token ids are exact in float32 below 2**24)
        packed = torch.cat([chosen, top_v, top_i.float()], dim=1).tolist()
        out = {}
        for j, i in enumerate(rows):
            n = seqs[i].params.logprobs
            row = packed[j]
            out[i] = TokenLogprob(tokens[i], row[0], list(zip(map(int, row[1 + k:1 + k + n]), row[1:1 + n])))
        return out

    def _ends(self, p) -> list[int]:
        """The tokens that end a sequence with ``p``: EOS (unless ignored) and its stop token ids."""
        return sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids)))

    def _fail(self, s: Sequence, error: str, bad_request: bool = False, code: str | None = None) -> RequestOutput:
        """End ``s`` alone with ``error`` (its slot is freed; the batch goes on)."""
        out = self._retire(s, "abort")
        out.error, out.bad_request, out.error_code = error, bad_request, code
        return out

    def _retire(self, s: Sequence, reason: FinishReason) -> RequestOutput:
        """Take ``s`` out of the engine at once (a score answered, or a failure): its final, empty output."""
        self._by_id.pop(s.request_id, None)
        self.scheduler.finish(s)
        if reason == "abort":
            self.counters.failed += 1
        else:
            self.counters.finished += 1
        return self._output(s, [], "", reason)

    def _output(self, s: Sequence, ids: list[int], text: str, reason) -> RequestOutput:
        lps = s.token_logprobs[len(s.output_ids) - len(ids):] if s.params.logprobs is not None else None
        return RequestOutput(s.request_id, list(ids), text, finished=reason is not None, finish_reason=reason,
                             prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.output_ids), logprobs=lps,
                             stop_reason=s.stop_reason if reason is not None else None)
