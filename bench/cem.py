"""Few-shot CEM wall time: 10 shots of a task, K experts, a whole population evaluated per generation
through the engine (every member a different mixture in the same batches).

    python bench/cem.py                                          # CPU, SmolLM2, data found as below
    python bench/cem.py --data DATA --device cuda --generations 50

Experts are random SVF experts (the search's cost does not depend on what they learnt); shots are
ARC-Easy training questions answered by their letter. Reports wall time, time per generation and
score requests per second, with peak memory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import data_dir, engine_spec, machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402


def arc_shots(data: Path, n: int):
    from experts.pass1.few_shot import Shot

    shots = []
    for line in open(data / "arc/ARC-Easy-Train.jsonl", encoding="utf-8"):
        r = json.loads(line)
        q = r["question"]
        text = q["stem"] + "\n" + "\n".join(f"{c['label']}. {c['text']}" for c in q["choices"]) + "\nAnswer with the letter."
        shots.append(Shot(text, r["answerKey"]))
        if len(shots) == n:
            return shots
    return shots


async def run(args) -> dict:
    from adapters import SVFExpert
    from engine.native.async_engine import AsyncEngine
    from experts.pass1.cem import CEMConfig
    from experts.pass1.few_shot import FewShotSearch, FewShotSpec

    engine = AsyncEngine.from_spec(engine_spec(args.model, args.device, args.max_num_seqs, 1024))
    engine.start()
    g = torch.Generator().manual_seed(0)
    experts = [SVFExpert(f"e{k}", {t.name: 2.0 + torch.randn(t.rank, generator=g) for t in engine.runtime.targets})
               for k in range(args.experts)]
    spec = FewShotSpec("bench", [e.name for e in experts], arc_shots(Path(args.data), args.shots),
                       CEMConfig(population=args.population, generations=args.generations, seed=0),
                       per_matrix=args.per_matrix)
    search = FewShotSearch(engine, spec, experts)
    ticks = []

    def progress(gen, res):
        ticks.append(time.perf_counter())
        print(f"  generation {gen}/{args.generations}: best fitness {res.best_fitness:.4f} "
              f"({ticks[-1] - t0:.1f} s)", flush=True)

    t0 = time.perf_counter()
    res = await search.run(progress)
    wall = time.perf_counter() - t0
    await engine.shutdown()
    n_req = args.generations * args.population * len(spec.shots)
    return {"wall_s": wall, "per_generation_s": wall / args.generations, "score_requests": n_req,
            "requests_per_s": n_req / wall, "best_fitness": res.best_fitness, "alpha": res.best.tolist(),
            "shots": len(spec.shots), "population": args.population, "generations": args.generations,
            "experts": args.experts, "per_matrix": args.per_matrix}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="benchmark data root (default: $T2_DATA_DIR)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--per-matrix", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--out", default="results/bench_cem.json")
    args = ap.parse_args()
    args.data = data_dir(args.data)
    res = asyncio.run(run(args))
    print()
    print_table([res], ["shots", "experts", "population", "generations", "wall_s", "per_generation_s", "requests_per_s"])
    print("goal: <= 60 s on CPU for 10 shots (reference settings: population 32, 50 generations)")
    mem = {"peak_rss_mb": peak_rss_mb(),
           "peak_gpu_mb": peak_gpu_mb(torch.device("cuda")) if torch.cuda.is_available() else None}
    print(f"peak RSS {mem['peak_rss_mb']:.0f} MiB; peak GPU {mem['peak_gpu_mb']}")
    write_json(args.out, {**res, "memory": mem, "machine": machine(), "args": vars(args)})


if __name__ == "__main__":
    main()
