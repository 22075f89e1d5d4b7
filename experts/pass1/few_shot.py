"""Few-shot adaptation: find mixing weights α over K experts for a task from a few examples (CEM).

Fitness of one α is measured on the task's shots through the engine: every (member, shot) pair is one
score request whose rows carry that member's mixture, so a whole population is evaluated in shared
batches. Fitness is the mean per-token log-likelihood of the answers (`loglik`), or the accuracy of greedy
answers with the log-likelihood as tie-break (`exact_match`: the reply equals the shot's answer, or whatever
the caller's `judge` accepts, such as a task's own scorer). The log-likelihood favours the phrasing of the
shots' answers: an expert that answers correctly in another form scores below the base model on it, so
where a task has a scorer, accuracy is the fitness that finds it (the paper's CEM searches on task
performance). The requests run at
background priority, a bounded number at a time: a search never delays users' requests by more than the
engine steps already under way.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Callable

import torch

from adapters.adaptation import Adaptation, SVFExpert
from engine.contract import BACKGROUND, GenerationRequest, SamplingParams, ScoreSpec
from experts.pass1.cem import CEMConfig, CEMResult, cem

_ids = itertools.count()


@dataclass
class Shot:
    prompt: str
    answer: str


@dataclass
class FewShotSpec:
    task: str
    experts: list[str]
    shots: list[Shot]
    cem: CEMConfig
    per_matrix: bool = False  # α per expert × matrix instead of one per expert
    fitness: str = "loglik"  # loglik | exact_match

    def digest(self, expert_digests: list[str]) -> str:
        """Identity of the inputs: the same experts (by content), shots and settings give the same α."""
        blob = json.dumps({"experts": self.experts, "digests": expert_digests,
                           "shots": [[s.prompt, s.answer] for s in self.shots], "cem": vars(self.cem),
                           "per_matrix": self.per_matrix, "fitness": self.fitness}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def prompt_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(text)


class FewShotSearch:
    def __init__(self, engine, spec: FewShotSpec, experts: list[SVFExpert], max_in_flight: int = 64,
                 judge: Callable[[int, str], bool] | None = None, max_tokens: int | None = None):
        """`judge(i, reply)`: is a greedy reply to shot i right (`exact_match` fitness; default: equals its
        answer). `max_tokens`: reply length for judging (default: the answer's length in characters + 8)."""
        self.engine, self.spec, self.experts = engine, spec, experts
        self.judge = judge or (lambda i, text: text.strip() == spec.shots[i].answer.strip())
        self.max_tokens = max_tokens
        # Background work: at most this many requests queued or running at once, so users keep their room
        # in the engine's queue (and the scheduler admits them first: priority BACKGROUND).
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self.targets = list(experts[0].z)
        tok = engine.tokenizer
        self._shots = []
        for s in spec.shots:
            p = prompt_ids(tok, s.prompt)
            a = tok.encode(s.answer, add_special_tokens=False)
            if not a:
                raise ValueError("every shot needs a non-empty answer")
            self._shots.append((p, a))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.experts), len(self.targets)) if self.spec.per_matrix else (len(self.experts),)

    def adaptation(self, alpha: torch.Tensor, label: str = "") -> Adaptation:
        alpha = alpha.to(torch.float32)
        if self.spec.per_matrix:
            return Adaptation.per_matrix_mixture(self.experts, alpha, self.targets, label=label)
        return Adaptation.mixture(list(zip(self.experts, alpha)), label=label)

    async def _run(self, req: GenerationRequest):
        last = None
        async with self._in_flight:
            async for out in self.engine.generate(req):
                last = out
        if last is None or last.error:
            raise RuntimeError(f"fitness evaluation failed: {getattr(last, 'error', None)}")
        return last

    async def _loglik(self, adaptations: list[Adaptation]) -> list[list[float]]:
        """Mean per-token log-likelihood of every shot's answer under every adaptation: (P, shots).

        Requests go in shot-major order (shot 0 of every member, then shot 1, ...): the engine admits in
        arrival order, so each prefill batch holds copies of one or two shots, rows of (nearly) equal
        length, and little of the batch is padding.
        """
        reqs = [GenerationRequest(f"cem-{next(_ids)}", p + ans, SamplingParams(max_tokens=1), a,
                                  score=ScoreSpec(continuation_start=len(p)), priority=BACKGROUND)
                for p, ans in self._shots for a in adaptations]
        outs = await asyncio.gather(*(self._run(r) for r in reqs))
        ll = [o.scores.continuation_logprob / o.scores.continuation_tokens for o in outs]
        P = len(adaptations)
        return [ll[i::P] for i in range(P)]

    async def _reply(self, req: GenerationRequest) -> str:
        parts = []
        async with self._in_flight:
            async for out in self.engine.generate(req):
                if out.error:
                    raise RuntimeError(f"fitness evaluation failed: {out.error}")
                parts.append(out.text)
        return "".join(parts)

    async def _exact(self, a: Adaptation) -> list[float]:
        reqs = [GenerationRequest(f"cem-{next(_ids)}", p,
                                  SamplingParams(max_tokens=self.max_tokens or len(s.answer) + 8, temperature=0), a,
                                  priority=BACKGROUND)
                for (p, _), s in zip(self._shots, self.spec.shots)]
        texts = await asyncio.gather(*(self._reply(r) for r in reqs))
        return [float(self.judge(i, t)) for i, t in enumerate(texts)]

    async def fitness(self, population: torch.Tensor) -> torch.Tensor:
        """(P, *shape) α -> (P,) fitness; all members' requests are in flight together."""
        adaptations = [self.adaptation(alpha) for alpha in population]
        ll = await self._loglik(adaptations)
        scores = torch.tensor([sum(x) / len(x) for x in ll], dtype=torch.float64)
        if self.spec.fitness == "exact_match":
            acc = await asyncio.gather(*(self._exact(a) for a in adaptations))
            # Accuracy first; the log-likelihood (negative, small) only breaks ties between equal accuracies.
            scores = torch.tensor([sum(x) / len(x) for x in acc], dtype=torch.float64) + 1e-3 * torch.tanh(scores)
        return scores

    async def run(self, progress=None) -> CEMResult:
        return await cem(self.fitness, self.shape, len(self.experts), self.spec.cem, progress)
