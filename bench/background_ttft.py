"""Users' time to first token while a few-shot (CEM) search runs in the background, against the same users
alone, measured in one run on the embedded model.

    python bench/background_ttft.py                  # CPU, SmolLM2, 32 users, population 32 x 10 shots
    python bench/background_ttft.py --device cuda --out results/background_ttft_gpu.json

Phases (each the same user load: ``--users`` concurrent users, each sending ``--requests`` completions of
``--max-tokens`` greedy tokens one after another):
  alone           no background work (the baseline)
  with search     a CEM search (population x shots score requests per generation) running meanwhile, its
                  requests at background priority and bounded in flight (how the server runs them)
  search as users the same search with its requests at user priority and unbounded (how they ran before)
Reports TTFT p50/p90 per phase, the ratio to the baseline (goal: p50 with the search <= 2x alone),
generations the search completed, and peak memory. Experts are random SVF experts; shots are generated
sums, so no data files are needed.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import engine_spec, machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "def fibonacci(n):",
           "Explain why the sky is blue.", "List three fruits.", "Translate 'good morning' to Spanish."]


async def user(engine, uid: int, n: int, max_tokens: int, ttfts: list[float]) -> None:
    from engine.contract import GenerationRequest, SamplingParams

    tok = engine.tokenizer
    for i in range(n):
        ids = tok.encode(PROMPTS[(uid + i) % len(PROMPTS)])
        req = GenerationRequest(f"user-{uid}-{i}-{time.monotonic_ns()}", ids,
                                SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        first = None
        async for out in engine.generate(req):
            if first is None and out.token_ids:
                first = time.perf_counter() - t0
        ttfts.append(first)


async def phase(engine, args, search=None) -> dict:
    ttfts: list[float] = []
    generations = []
    task = None
    if search is not None:
        task = asyncio.create_task(search.run(lambda gen, res: generations.append(gen)))
        await asyncio.sleep(1.0)  # the search's requests are in the engine before the users come
    t0 = time.perf_counter()
    await asyncio.gather(*(user(engine, u, args.requests, args.max_tokens, ttfts) for u in range(args.users)))
    seconds = time.perf_counter() - t0
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ttfts.sort()
    return {"requests": len(ttfts), "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))], "seconds": seconds,
            "search_generations": len(generations)}


def make_search(engine, args, as_users: bool):
    from adapters import SVFExpert
    from experts.pass1 import few_shot
    from experts.pass1.cem import CEMConfig
    from experts.pass1.few_shot import FewShotSearch, FewShotSpec, Shot

    g = torch.Generator().manual_seed(0)
    experts = [SVFExpert(f"e{k}", {t.name: torch.randn(t.rank, generator=g) for t in engine.runtime.targets})
               for k in range(3)]
    shots = [Shot(f"What is {a} + {a + 3}? Answer with the number.", str(2 * a + 3)) for a in range(args.shots)]
    spec = FewShotSpec("bench", [e.name for e in experts], shots,
                       CEMConfig(population=args.population, generations=1000, seed=0))
    if as_users:  # before: the search's requests at user priority, all in flight at once
        few_shot.BACKGROUND = 0
        return FewShotSearch(engine, spec, experts, max_in_flight=10**6)
    few_shot.BACKGROUND = 1
    return FewShotSearch(engine, spec, experts)


async def run(args) -> dict:
    from engine.native.async_engine import AsyncEngine

    print("loading the model (the first run converts the embedded GGUF and computes SVD factors)", flush=True)
    engine = AsyncEngine.from_spec(engine_spec(args.model, args.device, args.max_num_seqs, 1024))
    engine.start()
    rows = []
    for name, as_users in (("alone", None), ("with search", False), ("search as users", True)):
        print(f"phase: {name} ...", flush=True)
        search = None if as_users is None else make_search(engine, args, as_users)  # sets the priority it runs at
        r = {"phase": name, **await phase(engine, args, search)}
        rows.append(r)
        print(f"  TTFT p50 {r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms, "
              f"{r['search_generations']} search generation(s)", flush=True)
    await engine.shutdown()
    base = rows[0]["ttft_p50_ms"]
    for r in rows:
        r["p50_vs_alone"] = round(r["ttft_p50_ms"] / base, 2)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"rows": rows, "goal": "ttft p50 with search <= 2x alone", "met": rows[1]["p50_vs_alone"] <= 2.0,
            "settings": vars(args), "machine": machine(), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": peak_gpu_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="completions per user, one after another")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--out", default="results/background_ttft.json")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    print_table(res["rows"], ["phase", "requests", "ttft_p50_ms", "ttft_p90_ms", "p50_vs_alone", "search_generations",
                              "seconds"])
    print(f"goal {res['goal']}: {'met' if res['met'] else 'NOT met'}; peak RSS {res['peak_rss_mb']} MB")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
