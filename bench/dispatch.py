"""Pass-1 benchmark on the embedded model: dispatch accuracy and pass-1 cost.

1. Accuracy: labelled requests from the benchmark data (math: GSM8K and MATH-500 questions; code: MBPP
   and HumanEval prompts; reasoning: ARC-Challenge questions) classified by the `prompt` strategy (and
   `cls_expert` when a classifier expert file is given), with categories math/code/reasoning registered.
2. Cost: each request's pass 1 (classification) and pass 2 (128 generated tokens) timed one request at a
   time; pass 1 as a share of pass 2 and of the whole request (the paper's prompt strategy: 13-47%).

    python bench/dispatch.py [--data DATA] [--classifier experts/builtin/classifier.safetensors]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import data_dir, engine_spec, machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402


def labelled(data: Path, per_category: int, seed: int) -> list[tuple[str, str]]:
    def jsonl(p):
        return [json.loads(l) for l in open(p, encoding="utf-8") if l.strip()]

    rng = random.Random(seed)
    math_q = [r["question"] for r in jsonl(data / "gsm8k/test.jsonl")] + [r["problem"] for r in jsonl(data / "math500/test.jsonl")]
    # MBPP's test range (task ids 11-510) only: the classifier expert trains on the other ids.
    code_q = [r["text"] for r in jsonl(data / "mbpp/mbpp.jsonl") if 11 <= r["task_id"] <= 510] + \
        [r["prompt"] for r in jsonl(data / "humaneval/HumanEval.jsonl")]
    reas_q = []
    for r in jsonl(data / "arc/ARC-Challenge-Test.jsonl"):
        q = r["question"]
        reas_q.append(q["stem"] + "\n" + "\n".join(f"{c['label']}. {c['text']}" for c in q["choices"]))
    out = []
    for cat, pool in (("math", math_q), ("code", code_q), ("reasoning", reas_q)):
        out += [(cat, q) for q in rng.sample(pool, per_category)]
    rng.shuffle(out)
    return out


def neutral_expert(runtime, name: str):
    from adapters import SVFExpert

    # sakana z = 12: sigmoid ≈ 1, so W' ≈ W; pass-1 routing does not depend on what the experts do.
    return SVFExpert(name, {t.name: torch.full((t.rank,), 12.0) for t in runtime.targets})


async def main_async(args) -> dict:
    from safetensors.torch import load_file

    from adapters import SVFExpert
    from engine.contract import GenerationRequest, SamplingParams
    from engine.native.async_engine import AsyncEngine
    from experts.pass1.dispatch import Dispatcher
    from experts.store.registry import ExpertRegistry

    engine = AsyncEngine.from_spec(engine_spec(args.model, args.device, 16, 2048))
    engine.start()
    reg = ExpertRegistry()
    for cat in ("math", "code", "reasoning"):
        reg.put(neutral_expert(engine.runtime, cat), {"kind": "svf", "category": cat})
    strategies = ["prompt"]
    if args.classifier:
        clf = SVFExpert("classifier", {k: v.float() for k, v in load_file(args.classifier).items()})
        reg.put(clf, {"kind": "svf", "category": "classifier"})
        strategies.append("cls_expert")
    disp = Dispatcher(engine, reg)
    items = labelled(Path(args.data), args.per_category, args.seed)

    acc_rows = []
    for strategy in strategies:
        t0 = time.perf_counter()
        decisions = await asyncio.gather(*(disp.decide(strategy, q) for _, q in items))
        wall = time.perf_counter() - t0
        per_cat = {}
        for (cat, _), d in zip(items, decisions):
            per_cat.setdefault(cat, []).append(d.chosen == cat)
        correct = sum(sum(v) for v in per_cat.values())
        row = {"strategy": strategy, "n": len(items), "accuracy": correct / len(items),
               **{f"acc_{c}": sum(v) / len(v) for c, v in sorted(per_cat.items())},
               "pass1_wall_s": wall}
        acc_rows.append(row)
        print(f"{strategy}: accuracy {row['accuracy']:.3f} over {len(items)} requests ({wall:.1f} s batched)", flush=True)

    cost = []
    for i, (cat, q) in enumerate(items[: args.timed]):
        t0 = time.perf_counter()
        d = await disp.decide("prompt", q)
        t1 = time.perf_counter()
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                   add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        req = GenerationRequest(f"gen{i}", ids, SamplingParams(max_tokens=args.gen_tokens, temperature=0,
                                                               ignore_eos=True), d.adaptation)
        async for _ in engine.generate(req):
            pass
        t2 = time.perf_counter()
        cost.append((t1 - t0, t2 - t1))
        print(f"  request {i}: pass 1 {1000 * (t1 - t0):.0f} ms, pass 2 {t2 - t1:.2f} s", flush=True)
    p1 = statistics.median(c[0] for c in cost)
    p2 = statistics.median(c[1] for c in cost)
    share = sum(c[0] for c in cost) / sum(c[1] for c in cost)
    await engine.shutdown()
    return {"accuracy": acc_rows, "cost": {"pass1_ms_median": 1000 * p1, "pass2_s_median": p2,
                                           "pass1_over_pass2": share, "gen_tokens": args.gen_tokens,
                                           "requests": len(cost), "prefix_cache_hits": engine.llm.prefix_cache.hits}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="benchmark data folder (gsm8k/, mbpp/, humaneval/, arc/, math500/); "
                    "default: $T2_DATA_DIR")
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classifier", default=None, help="classifier expert: safetensors of z per target, for cls_expert")
    ap.add_argument("--per-category", type=int, default=50)
    ap.add_argument("--timed", type=int, default=6, help="requests timed one by one for the cost figures")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_pass1.json")
    args = ap.parse_args()
    args.data = data_dir(args.data)
    res = asyncio.run(main_async(args))
    print()
    print_table(res["accuracy"], list(res["accuracy"][0].keys()))
    c = res["cost"]
    print(f"\npass 1 median {c['pass1_ms_median']:.0f} ms; pass 2 ({c['gen_tokens']} tokens) median "
          f"{c['pass2_s_median']:.2f} s; pass 1 / pass 2 = {100 * c['pass1_over_pass2']:.1f}% (goal <= 5%; "
          f"the paper's prompt strategy: 13-47%)")
    mem = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(torch.device("cuda")) if torch.cuda.is_available() else None}
    print(f"peak RSS {mem['peak_rss_mb']:.0f} MiB")
    write_json(args.out, {**res, "memory": mem, "machine": machine(), "args": vars(args)})


if __name__ == "__main__":
    main()
