"""What the OpenAI sampling features cost the native engine: the same stream of requests served plain, with
logprobs (top 5), with penalties and a logit bias, and with structured outputs (a JSON schema on every row, and
on every other row), each against the plain run measured in the same run.

The stream of bench/batching.py (mixed prompt lengths, 16-128 new tokens, greedy, EOS ignored), all queued at
t=0 on one engine. A structured row ends when its JSON document is complete, so a structured run is compared
with a plain run of the same requests generating exactly as many tokens each (prefill then weighs the same).
Goals: logprobs cost <= 5% of throughput, structured outputs <= 10%. Reports peak RSS and peak GPU memory.
Each cost is reported three ways: the best round of each variant against the best plain round, each round
against the same round's plain run (paired_costs, median over rounds), and on the native engine the share of
each run spent in the feature's own code (attributed_costs, median over rounds: steady on a host whose whole
runs differ by tens of percent).

``--engine vllm`` runs the same variants on the vLLM engine (rows mode, CUDA graphs on; needs a GPU and vLLM):
every request is sent at once and vLLM batches them. There a structured row ends with its grammar's EOS.
On SmolLM2 a decode step of 128 rows takes a few milliseconds of GPU time, so vLLM's host work per token and
per step (the grammar's token masks, the logprobs' Python objects) weighs as much as the model; ``--shape
llama3-8b`` serves the same requests on the Llama-3-8B shape (random weights, vLLM's dummy load, no
detokenization in either run), where the GPU sets the pace as it does for the models users serve. On vLLM each
variant is also served straight through vLLM's own ``AsyncLLM`` with the same vLLM sampling parameters
(``direct`` rows: no request or output handling of this engine), so that a cost splits into vLLM's and this
engine's. Requests are sent from the loop that owns vLLM, as the server sends them; ``--hop`` also sends them
from a loop of their own (``hop`` rows: outputs cross threads, as before the server shared its loop with vLLM).

    python bench/sampling_features.py [--requests 64] [--device cuda] [--out results/sampling_features.json]
    python bench/sampling_features.py --engine vllm --requests 512 --max-num-seqs 128 [--shape llama3-8b]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.batching import load, workload  # noqa: E402
from bench.common import MemorySampler, Timer, machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.contract import GenerationRequest, SamplingParams, Structure  # noqa: E402
from engine.native.llm_engine import EngineConfig, LLMEngine  # noqa: E402

SCHEMA = Structure("json", json.dumps({
    "type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "year", "tags"], "additionalProperties": False}))
VARIANTS = {
    "plain": {},
    "logprobs": {"logprobs": 5},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
                  "logit_bias": {13: -5.0, 42: 2.0}},
    "json-schema": {"structure": SCHEMA},
    "json-schema-half": lambda i: {"structure": SCHEMA} if i % 2 else {},  # constrained and free rows mixed
}


class FeatureClock:
    """The seconds the native engine spends in the features' own code during a run: logprobs
    (``LLMEngine._logprobs``: its log-softmax, top-k and their copies to the host) and structured outputs (the
    grammar masks filled and applied, each matcher's accept and end checks). Against the same run's seconds
    this is the feature's attributed cost: measured within the very steps it is part of, it does not move with
    a host whose whole runs differ by tens of percent. The engine's steps wait on the GPU at each sampled
    token, so a feature's GPU work is timed with its host work."""

    def __init__(self):
        self.seconds = 0.0
        self._saved: list[tuple] = []

    def __enter__(self):
        import xgrammar

        from engine.structured import Grammars
        for owner, name in ((LLMEngine, "_logprobs"), (Grammars, "mask"), (xgrammar.GrammarMatcher, "accept_token"),
                            (xgrammar.GrammarMatcher, "is_terminated")):
            fn = owner.__dict__[name]
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._timed(fn))
        return self

    def _timed(self, fn):
        inner = fn.__func__ if isinstance(fn, staticmethod) else fn

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return staticmethod(timed) if isinstance(fn, staticmethod) else timed

    def __exit__(self, *exc):
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)


def serve(model, tok, reqs, max_num_seqs: int, extra: dict, device) -> tuple[float, int, list[tuple], float]:
    """(seconds, generated tokens, the requests as (prompt, tokens each generated): a plain run of these
    generates exactly as many tokens per request, the seconds of those spent in the features' own code)."""
    eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=512, max_prefill_tokens=2048))
    for i, (ids, mt) in enumerate(reqs):
        kw = extra(i) if callable(extra) else extra
        eng.add_request(GenerationRequest(str(i), ids, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True,
                                                                      **kw)))
    counts = [0] * len(reqs)
    with FeatureClock() as clock, Timer(device) as t:
        while eng.has_work:
            for o in eng.step():
                counts[int(o.request_id)] += len(o.token_ids)
    return t.seconds, sum(counts), [(ids, max(c, 1)) for (ids, _), c in zip(reqs, counts)], clock.seconds


def _all_at_once(reqs, extra, count, loop) -> tuple[float, int, list[tuple], None]:
    """Every request sent at once from ``loop`` (the one that owns vLLM, as in the server); ``count(i, ids,
    params)`` serves one and returns its generated tokens."""
    def params(i, mt):
        kw = extra(i) if callable(extra) else extra
        return SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos="structure" not in kw, **kw)

    async def run():
        return await asyncio.gather(*(count(i, ids, params(i, mt)) for i, (ids, mt) in enumerate(reqs)))

    t0 = time.perf_counter()
    counts = asyncio.run(run()) if loop is None else asyncio.run_coroutine_threadsafe(run(), loop).result()
    seconds = time.perf_counter() - t0
    return seconds, sum(counts), [(ids, max(c, 1)) for (ids, _), c in zip(reqs, counts)], None


def serve_vllm(engine, reqs, extra, hop: bool = False) -> tuple[float, int, list[tuple], None]:
    """``serve`` on the vLLM engine: every request at once, from the loop that owns vLLM (the server's way), or
    (``hop``) from a loop of their own, whose outputs cross threads through ``engine.contract.Handoff``."""
    async def count(i, ids, params):
        n = 0
        async for o in engine.generate(GenerationRequest(f"s{time.monotonic_ns()}-{i}", list(ids), params)):
            if o.error:
                raise RuntimeError(o.error)
            n += len(o.token_ids)
        return n

    return _all_at_once(reqs, extra, count, None if hop else engine._loop)


def serve_direct(engine, reqs, extra) -> tuple[float, int, list[tuple], None]:
    """``serve_vllm`` through vLLM's ``AsyncLLM`` itself: the vLLM parameters this engine would send, none of its
    request or output handling."""
    async def count(i, ids, params):
        n = 0
        async for o in engine.llm.generate({"type": "token", "prompt_token_ids": list(ids)},
                                           engine.sampling_params(params), f"d{time.monotonic_ns()}-{i}"):
            n += len(o.outputs[0].token_ids)
        return n

    return _all_at_once(reqs, extra, count, engine._loop)


def vllm_server(args, folder: str):
    """(serve function, engine) of a vLLM engine on ``folder``, or on the Llama-3-8B shape."""
    from engine.vllm.engine import VLLMEngine, VLLMOptions

    common = dict(dtype="bfloat16", max_model_len=512, max_num_seqs=args.max_num_seqs, max_waiting=100_000,
                  gpu_memory_utilization=args.gpu_memory, structured_backend=args.structured_backend)
    if args.shape == "llama3-8b":
        from bench.vllm_bench import llama3_8b_folder
        from engine.spec import default_cache_dir

        shape = llama3_8b_folder(folder, default_cache_dir() / "llama3-8b-shape")
        opts = VLLMOptions(model=str(shape), served_name="llama3-8b-shape", skeleton=False, load_format="dummy",
                           detokenize=False, adapt_targets="none", **common)
    else:
        opts = VLLMOptions(model=folder, served_name="smollm2", adapt_targets="all", **common)
    engine = VLLMEngine.from_options(opts)
    return (lambda reqs, extra: serve_vllm(engine, reqs, extra)), engine


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded SmolLM2)")
    ap.add_argument("--engine", choices=["native", "vllm"], default="native")
    ap.add_argument("--device", default="cpu", help="native engine's device")
    ap.add_argument("--shape", choices=["smollm2", "llama3-8b"], default="smollm2",
                    help="vLLM engine: the model's own weights, or the Llama-3-8B shape with random weights")
    ap.add_argument("--gpu-memory", type=float, default=0.5, help="vLLM's share of the GPU memory")
    ap.add_argument("--structured-backend", choices=["guidance", "xgrammar"], default="guidance",
                    help="vLLM engine: its grammar engine for structured outputs (the vllm_structured_backend setting)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2,
                    help="each variant is run this many times: the best counts, and each round's cost against the "
                         "same round's plain run (paired_costs: their median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS),
                    help="which variants run (plain always does)")
    ap.add_argument("--hop", action="store_true", help="vLLM engine: also serve from a loop of the callers' own "
                    "('hop' rows: outputs cross threads), against the loop that owns vLLM (the server's way)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.engine == "vllm":
        from transformers import AutoTokenizer

        from engine.loader import embedded_gguf_path, gguf_to_hf_folder
        from engine.spec import default_cache_dir

        device = torch.device("cuda")
        folder = args.model or str(gguf_to_hf_folder(embedded_gguf_path(), default_cache_dir()))
        tok = AutoTokenizer.from_pretrained(folder)
        name = Path(folder).name if args.shape == "smollm2" else "llama3-8b-shape (random weights)"
        run_, engine = vllm_server(args, folder)
        direct = (lambda rs, extra: serve_direct(engine, rs, extra))
        hop = (lambda rs, extra: serve_vllm(engine, rs, extra, hop=True)) if args.hop else None
    else:
        model, tok, engine_tok, name, device = load(SimpleNamespace(model=args.model, device=args.device,
                                                                    shape="smollm2"))

        def run_(rs, extra):
            return serve(model, engine_tok, rs, args.max_num_seqs, extra, device)
        direct = hop = None
    reqs = workload(tok, args.requests, args.seed)
    # warm-up: on vLLM the whole stream once (its first full batch compiles and captures what the timed runs
    # reuse; a 4-request warm-up left the first timed run 23% slower than the same run later)
    run_(reqs if args.engine == "vllm" else reqs[:4], {})
    best: dict[str, dict] = {}
    sampler = MemorySampler().__enter__() if args.engine == "vllm" else None  # vLLM's workers are other processes

    rounds: dict[str, list[float]] = {}  # every round's tok/s: the spread says how far one round can be trusted

    attributed: dict[str, list[float]] = {}  # native engine: each round's seconds in the feature's own code / run's

    def keep(variant: str, seconds: float, tokens: int, feature_s: float | None) -> None:
        print(f"round {r + 1} {variant}: {tokens / seconds:.1f} tok/s", flush=True)
        rounds.setdefault(variant, []).append(round(tokens / seconds, 1))
        if feature_s is not None:
            attributed.setdefault(variant, []).append(feature_s / seconds)
        if variant not in best or seconds < best[variant]["seconds"]:
            best[variant] = {"variant": variant, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}

    chosen = [(v, e) for v, e in VARIANTS.items() if v == "plain" or v in args.variants]
    paths = [(prefix, serve_) for prefix, serve_ in (("", run_), ("direct ", direct), ("hop ", hop)) if serve_]
    for r in range(args.rounds):
        # interleaved, and every other round in reverse order: a drift of the machine within a round weighs on
        # a variant and on the plain run it is paired with alike, on average over the rounds
        order = chosen if r % 2 == 0 else chosen[::-1]
        for variant, extra in order:
            for prefix, serve_ in paths:
                if variant.startswith("json"):  # a structured row ends with its document: plain rows of those lengths
                    seconds, tokens, done, feature_s = serve_(reqs, extra)
                    keep(prefix + variant, seconds, tokens, feature_s)
                    seconds, tokens, _, feature_s = serve_(done, {})
                    keep(f"{prefix}plain, {variant}'s lengths", seconds, tokens, feature_s)
                else:
                    seconds, tokens, _, feature_s = serve_(reqs, extra)
                    keep(prefix + variant, seconds, tokens, feature_s)

    def base(variant: str) -> float:  # each path against its own plain run
        prefix = next((p for p in ("direct ", "hop ") if variant.startswith(p)), "")
        return best[prefix + "plain"]["tok_s"]

    rows = [{**b, "vs_plain": b["tok_s"] / base(b["variant"]), "rounds_tok_s": rounds[b["variant"]]}
            for b in best.values()]
    if args.rounds > 1:
        spread = max(max(v) / min(v) - 1 for v in rounds.values())
        print(f"rounds of one variant differ by up to {100 * spread:.0f}% (a cost below that is not shown by one run)")
    print_table(rows, ["variant", "tok_s", "vs_plain", "seconds", "tokens"])
    costs: dict[str, float] = {}
    for prefix in ("", *(["direct "] if direct else []), *(["hop "] if hop else [])):
        if prefix + "logprobs" in best:
            costs[prefix + "logprobs"] = c = 1 - best[prefix + "logprobs"]["tok_s"] / best[prefix + "plain"]["tok_s"]
            print(f"{prefix}logprobs cost {100 * c:.1f}% of throughput (goal <= 5%)")
        if prefix + "json-schema" in best:
            costs[prefix + "json-schema"] = c = 1 - (best[prefix + "json-schema"]["tok_s"]
                                                     / best[f"{prefix}plain, json-schema's lengths"]["tok_s"])
            print(f"{prefix}structured outputs (JSON schema, every row) cost {100 * c:.1f}% of throughput against "
                  "plain rows of the same lengths (goal <= 10%)")
    # Paired: each round's variant against the plain run of the same round, the median over rounds. Best-of
    # picks each variant's luckiest round on its own; on a host whose rounds of one variant differ by tens of
    # percent, the paired median is the steadier estimate (both are reported; the goal is read on this one).
    paired: dict[str, dict] = {}
    for name in costs:
        prefix = next((p for p in ("direct ", "hop ") if name.startswith(p)), "")
        ref = prefix + ("plain" if name.endswith("logprobs") else f"plain, {name[len(prefix):]}'s lengths")
        per_round = [1 - v / p for v, p in zip(rounds[name], rounds[ref])]
        paired[name] = {"median": statistics.median(per_round), "rounds": [round(c, 4) for c in per_round]}
        print(f"{name} cost, paired by round: median {100 * paired[name]['median']:.1f}% "
              f"(rounds: {', '.join(f'{100 * c:.1f}%' for c in per_round)})")
    # Attributed (native engine): the share of each run spent in the feature's own code, the median over rounds
    # (cost = feature seconds / run seconds: what the run would lose were that code free)
    attributed_costs = {name: {"median": statistics.median(v), "rounds": [round(c, 4) for c in v]}
                        for name, v in attributed.items() if name in costs}
    for name, a in attributed_costs.items():
        print(f"{name} cost, attributed (its own code's share of each run): median {100 * a['median']:.1f}% "
              f"(rounds: {', '.join(f'{100 * c:.1f}%' for c in a['rounds'])}; goal <= "
              f"{5 if name.endswith('logprobs') else 10}%)")
    cost, structured = costs.get("logprobs"), costs.get("json-schema")
    mem = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": sampler.mb if sampler else peak_gpu_mb(device)}
    print(f"peak RSS {mem['peak_rss_mb']:.0f} MiB; peak GPU {mem['peak_gpu_mb'] or 0:.0f} MiB")
    if args.engine == "vllm":
        engine.close()
    write_json(args.out, {"machine": machine(), "model": name, "engine": args.engine, "settings": vars(args),
                          "rows": rows,
                          "logprobs_cost": cost, "goal": 0.05,
                          "structured_cost": structured, "structured_goal": 0.10, "costs": costs,
                          "paired_costs": paired, "attributed_costs": attributed_costs,
                          "memory": mem})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
