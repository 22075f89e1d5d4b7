"""Native engine vs the vLLM engine: throughput and time to first token, base and mixed workloads.

One engine and one shape per run (each in its own process, so that one GPU serves one engine at a time),
then ``--summarize`` puts the runs side by side. The stream of bench/batching.py: 256 requests (prompts of
8-256 tokens, 16-128 new tokens, greedy, EOS ignored) all sent at t=0 through the engine contract
(``generate``), as the HTTP layer does. Workloads:
  base       every request on the base model
  mixed      request i carries mixture i % 5: the base model or one of 4 SAPT mixtures (one bundle of 4
             tasks, r=8, on q_proj and v_proj; on vLLM, rows of its SAPT bank)
  mixed-svf  (smollm2) the base model or one of the 4 SVF experts shipped for SmolLM2 (on vLLM, rows)
Shapes: ``smollm2`` (the model at --model), ``llama3-8b`` (random weights: the native engine builds the
model in memory, vLLM gets a config-only folder written here and random weights of its own).
Peak GPU memory: torch's peak for the native engine; the device's memory in use (all processes,
sampled) for both, vLLM's including the KV cache it reserves up front.

    python bench/vllm_bench.py --engine native --shape smollm2 --model FOLDER --out results/vllm/native_smollm2.json
    python bench/vllm_bench.py --engine vllm --shape llama3-8b --model FOLDER --out results/vllm/vllm_llama3_8b.json
    python bench/vllm_bench.py --summarize results/vllm/*.json --out results/vllm/summary.json
Goals: vLLM >= 3x the native engine on the 8B mixed workload; vLLM's mixed workload within 20% of its base.

``--rows`` (vLLM only; also what runs without arguments, on the embedded model): one run with three engines, one
after the other. First stock vLLM (no adaptation machinery: no hooks) serves the base workload; then
the rows engine (every request its own exact adaptation, engine/vllm/rows.py; SVF on the MLP matrices and the
SAPT bank beside them), then the SAPT-only rows engine (vllm_svf off: W kept, the bank beside it) serve
  base         every request on the base model (through the factored MLP on the rows engine)
  unique-svf   every request its own SVF mixture: random α over 4 experts (sakana z ~ 0.5 N(0, 1))
  unique-sapt  every request its own attention over one SAPT bundle (4 tasks, r = 8, on the MLP matrices)
``--prompts distinct`` gives every request random tokens of the same lengths: no shared prefixes for base
requests to reuse. Each workload runs ``--repeats`` times; the median run is kept. Reported: throughput and
TTFT of each against stock vLLM's base in the same run (goals: SVF unique >= 0.75x, SAPT unique >= 0.9x on the
SAPT-only engine, TTFT p50 <= 1.25x), the GPU memory of the factors, tables and bank, the SVD's time, host RSS
after each engine.

    python bench/vllm_bench.py --rows --shape llama3-8b --requests 512 --max-num-seqs 256 --model FOLDER \
        --out results/vllm/rows_llama3_8b.json
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
from bench.batching import workload  # noqa: E402
from bench.common import MemorySampler, machine, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.contract import GenerationRequest, SamplingParams  # noqa: E402
from engine.loader import resolve_model_folder  # noqa: E402
from engine.spec import default_cache_dir  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
SAPT_TARGETS = ("q_proj", "v_proj")
SHIPPED = ["gsm8k", "mbpp", "arc-easy", "classifier"]
ATTENTION = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]


# --- adaptations ------------------------------------------------------------------------------------

def sapt_mixtures(targets: dict[str, tuple[int, int]], d_model: int):
    from adapters import Adaptation, SAPTBundle

    torch.manual_seed(0)
    bundle = SAPTBundle(targets, d_model=d_model, num_tasks=4, rank=8, alpha=32)
    with torch.no_grad():
        for task in bundle.tasks:
            for B in task.B:
                B.normal_(0, 0.02)
    bundle.freeze()  # as the store serves it
    return [Adaptation.sapt_weights(bundle, torch.tensor(a), label=f"sapt{i}") for i, a in enumerate(ATTENTION)]


def shipped_experts():
    from adapters import Adaptation
    from experts.store.expert_file import read_expert_file

    root = Path(__file__).resolve().parent.parent / "experts" / "builtin"
    return [Adaptation.expert(read_expert_file(root / f"{name}.safetensors")[0]) for name in SHIPPED]


def sapt_target_shapes(runtime) -> dict[str, tuple[int, int]]:
    return {t.name: (t.out_features, t.in_features) for t in runtime.targets if t.name.endswith(SAPT_TARGETS)}


def placeholder_runtime(model):
    """Adaptive layers on the SAPT targets without an SVD (hours for an 8B model on the bench's clock):
    SAPT rows never read the factors, so zero-width ones stand in for them."""
    from adapters.layer import ActiveTable, AdaptiveLinear
    from adapters.runtime import AdaptationRuntime
    from adapters.svd_cache import SVDFactors
    from adapters.targets import find_targets

    slot = ActiveTable()
    for t in find_targets(model, list(SAPT_TARGETS)):
        w = model.get_submodule(t.name).weight
        factors = SVDFactors(w.new_zeros(t.out_features, 0), torch.zeros(t.rank, device=w.device),
                             w.new_zeros(0, t.in_features))
        parent, _, child = t.name.rpartition(".")
        setattr(model.get_submodule(parent), child, AdaptiveLinear(model.get_submodule(t.name), t, factors, slot))
    return AdaptationRuntime(model)


# --- engines ----------------------------------------------------------------------------------------

def native_engine(args):
    from adapters import install
    from bench.batching import load
    from engine.native.async_engine import AsyncEngine
    from engine.native.llm_engine import EngineConfig, LLMEngine

    model, tok, engine_tok, name, _ = load(SimpleNamespace(model=args.model, device="cuda", shape=args.shape))
    if args.shape == "llama3-8b":
        runtime = placeholder_runtime(model)
    else:
        runtime = install(model, "all", Path(args.cache_dir) / "svd", progress=False)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_prefill_tokens=4096)
    engine = AsyncEngine(LLMEngine(model, engine_tok, cfg, runtime), name, max_waiting=100_000)
    engine.start()
    mixtures = sapt_mixtures(sapt_target_shapes(runtime), model.config.hidden_size)
    mixtures[0].sapt.bundle.to("cuda")  # next to the model: no upload of the blocks when a batch is planned
    adaptations = {"mixed": mixtures}
    if args.shape == "smollm2":
        adaptations["mixed-svf"] = shipped_experts()
    return engine, tok, adaptations


def llama3_8b_folder(tokenizer_src: str, out: Path) -> Path:
    """A config-only Hugging Face folder of the Llama-3-8B shape (vLLM draws random weights for it)."""
    from transformers import AutoTokenizer, LlamaConfig

    LlamaConfig(**LLAMA3_8B, architectures=["LlamaForCausalLM"]).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(out)
    return out


def vllm_engine(args):
    from transformers import AutoConfig

    from engine.vllm.engine import VLLMEngine, VLLMOptions

    common = dict(cache_dir=Path(args.cache_dir), dtype="bfloat16", max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_waiting=100_000, gpu_memory_utilization=args.gpu_memory,
                  enforce_eager=args.eager, sapt_bank=args.sapt_bank)
    if args.shape == "llama3-8b":  # random weights: the SAPT bank on q_proj and v_proj, W kept (no SVD)
        folder = llama3_8b_folder(args.model, Path(args.cache_dir) / "llama3-8b-shape")
        opts = VLLMOptions(model=str(folder), served_name="llama3-8b-shape", skeleton=False, load_format="dummy",
                           detokenize=False, adapt_targets=",".join(SAPT_TARGETS), svf=False, **common)
    else:
        opts = VLLMOptions(model=args.model, served_name="smollm2", adapt_targets="all", **common)
    t0 = time.perf_counter()
    engine = VLLMEngine.from_options(opts)
    start_s = time.perf_counter() - t0
    cfg = AutoConfig.from_pretrained(opts.model)
    targets = {f"model.layers.{i}.self_attn.{p}": shape for i in range(cfg.num_hidden_layers)
               for p, shape in (("q_proj", (cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads),
                                            cfg.hidden_size)),
                                ("v_proj", (cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads),
                                            cfg.hidden_size)))}
    adaptations = {"mixed": sapt_mixtures(targets, cfg.hidden_size)}
    if args.shape == "smollm2":
        adaptations["mixed-svf"] = shipped_experts()
    return engine, engine.tokenizer, adaptations, start_s


# --- running ----------------------------------------------------------------------------------------

async def serve(engine, reqs, kinds) -> dict:
    """Send every request at once; wall time, generated tokens, time to first token of each."""
    t0 = time.perf_counter()
    ttft: list[float] = []

    async def one(i, ids, max_tokens):
        n, first = 0, None
        req = GenerationRequest(f"b{time.monotonic_ns()}-{i}", list(ids),
                                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                kinds[i % len(kinds)])
        async for out in engine.generate(req):
            if out.error:
                raise RuntimeError(out.error)
            if out.token_ids and first is None:
                first = time.perf_counter() - t0
            n += len(out.token_ids)
        ttft.append(first)
        return n

    tokens = sum(await asyncio.gather(*(one(i, ids, mt) for i, (ids, mt) in enumerate(reqs))))
    wall = time.perf_counter() - t0
    q = sorted(ttft)
    return {"seconds": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50_s": statistics.median(q),
            "ttft_p90_s": q[int(0.9 * (len(q) - 1))], "ttft_max_s": q[-1]}


def unique_svf(targets: list, n: int, seed: int) -> list:
    """n adaptations, each its own mixture of 4 SVF experts over ``targets`` ((name, out, in) triples)."""
    from adapters import Adaptation, SVFExpert

    g = torch.Generator().manual_seed(seed)
    experts = [SVFExpert(f"e{j}", {name: 0.5 * torch.randn(min(o, i), generator=g) for name, o, i in targets}).freeze()
               for j in range(4)]  # frozen, as the store serves them
    out = []
    for r in range(n):
        alpha = -torch.log(torch.rand(4, generator=g))  # Dirichlet(1, 1, 1, 1)
        out.append(Adaptation.mixture(list(zip(experts, (alpha / alpha.sum()).tolist())), label=f"u{r}"))
    return out


def unique_sapt(targets: list, d_model: int, n: int, seed: int) -> list:
    """n adaptations, each its own attention over one SAPT bundle of 4 tasks (r = 8) on ``targets``."""
    from adapters import Adaptation, SAPTBundle

    torch.manual_seed(seed)
    bundle = SAPTBundle({name: (o, i) for name, o, i in targets}, d_model=d_model, num_tasks=4, rank=8, alpha=32)
    with torch.no_grad():
        for task in bundle.tasks:
            for B in task.B:
                B.normal_(0, 0.02)
    bundle.freeze()  # as the store serves it
    g = torch.Generator().manual_seed(seed)
    return [Adaptation.sapt_weights(bundle, torch.softmax(2 * torch.randn(4, generator=g), 0), label=f"s{r}")
            for r in range(n)]


def distinct_prompts(reqs: list, tok, seed: int) -> list:
    """The same lengths with random token ids: no prompt shares a cached block with another (the windows of
    one text that the default prompts are share 44% of their tokens as prefixes, which base requests reuse
    and requests under distinct adaptations cannot)."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(len(tok), 32_000)
    return [(torch.randint(100, vocab, (len(ids),), generator=g).tolist(), mt) for ids, mt in reqs]


def host_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_rows(args) -> dict:
    """Stock vLLM's base workload, then the rows engine's base and unique workloads (see the docstring)."""
    from transformers import AutoConfig

    from engine.vllm.engine import VLLMEngine, VLLMOptions

    result = {"engine": "vllm", "mode": "rows", "shape": args.shape, "machine": machine(), "args": vars(args),
              "prompts": args.prompts, "rows": [], "phases": {}}
    common = dict(cache_dir=Path(args.cache_dir), dtype="bfloat16", max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_waiting=100_000, gpu_memory_utilization=args.gpu_memory,
                  enforce_eager=args.eager, sapt_bank=args.sapt_bank)
    if args.shape == "llama3-8b":
        folder = llama3_8b_folder(args.model, Path(args.cache_dir) / "llama3-8b-shape")
        common.update(model=str(folder), served_name="llama3-8b-shape", load_format="dummy", detokenize=False)
    else:
        common.update(model=args.model, served_name="smollm2")
    cfg = AutoConfig.from_pretrained(common["model"])
    reqs = None
    phases = (("stock", "none", True), ("rows", "mlp", True), ("sapt-only", "mlp", False))
    for phase, targets, svf in phases:
        sampler = MemorySampler().__enter__()
        t0 = time.perf_counter()
        engine = VLLMEngine.from_options(VLLMOptions(adapt_targets=targets, skeleton=False, svf=svf, **common))
        info = {"start_s": round(time.perf_counter() - t0, 1), "host_rss_after_start_mb": round(host_rss_mb())}
        print(f"{phase} engine up in {info['start_s']} s", flush=True)
        if reqs is None:
            reqs = workload(engine.tokenizer, args.requests, args.seed)
            if args.prompts == "distinct":
                reqs = distinct_prompts(reqs, engine.tokenizer, args.seed)
        try:
            workloads = {"base": ([None], [None])}
            if phase != "stock":
                info["rows_info"] = engine.rows_info
                mlp = [t for t in engine.rows_info["targets"]]
                if phase == "rows":
                    svf = unique_svf(mlp, len(reqs) + 16, args.seed)  # the same 4 experts, registered in warm-up
                    workloads["unique-svf"] = (svf[16:], svf[:16])
                sapt = unique_sapt(mlp, cfg.hidden_size, len(reqs) + 16, args.seed)  # one bundle, registered in warm-up
                workloads["unique-sapt"] = (sapt[16:], sapt[:16])
            for name, (kinds, warm) in workloads.items():
                asyncio.run(serve(engine, reqs[: max(16, len(warm))], warm))  # warm-up: experts and bundle registered
                runs = []
                for _ in range(args.repeats):  # every run prefills its prompts: none is served from an earlier run
                    asyncio.run_coroutine_threadsafe(engine.llm.reset_prefix_cache(), engine._loop).result(60)
                    before = engine.stats().get("acquire_s", 0.0)
                    runs.append(asyncio.run(serve(engine, reqs, kinds)))
                    runs[-1]["front_end_s"] = round(engine.stats().get("acquire_s", 0.0) - before, 4)  # recipes, wall
                r = dict(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2])  # the median run
                r.update(workload=name, engine_kind=phase, distinct_adaptations=len({id(k) for k in kinds}),
                         repeats=[round(x["tok_s"]) for x in runs])
                result["rows"].append(r)
                print(f"{phase} {args.shape} {name}: {r['tok_s']:.0f} tok/s (runs {r['repeats']}), "
                      f"ttft p50 {r['ttft_p50_s']:.3f} s", flush=True)
                write_json(args.out, result)
        finally:
            sampler.__exit__()
            info.update(device_peak_mb=sampler.mb, host_rss_mb=round(host_rss_mb()), host_peak_rss_mb=round(peak_rss_mb()))
            result["phases"][phase] = info
            write_json(args.out, result)
            engine.close()
    by = {(r["engine_kind"], r["workload"]): r for r in result["rows"]}
    stock = by.get(("stock", "base"))
    if stock:
        goals = {}
        for kind, name, goal in (("rows", "base", None), ("rows", "unique-svf", 0.75), ("rows", "unique-sapt", None),
                                 ("sapt-only", "base", None), ("sapt-only", "unique-sapt", 0.9)):
            r = by.get((kind, name))
            if r:
                name = f"{kind} {name}"
                goals[name] = {"throughput_ratio": r["tok_s"] / stock["tok_s"], "throughput_goal": goal,
                               "ttft_p50_ratio": r["ttft_p50_s"] / stock["ttft_p50_s"], "ttft_goal": 1.25}
                print(f"{name} / stock vLLM base: {goals[name]['throughput_ratio']:.3f}x throughput "
                      f"(goal {goal}), TTFT p50 {goals[name]['ttft_p50_ratio']:.2f}x (goal <= 1.25)")
        result["goals"] = goals
    write_json(args.out, result)
    return result


def run(args) -> dict:
    result = {"engine": args.engine, "shape": args.shape, "machine": machine(), "args": vars(args)}
    sampler = MemorySampler().__enter__()
    if args.engine == "native":
        engine, tok, adaptations = native_engine(args)
        torch.cuda.reset_peak_memory_stats()
    else:
        engine, tok, adaptations, result["start_s"] = vllm_engine(args)
        print(f"vLLM engine up in {result['start_s']:.1f} s", flush=True)
    reqs = workload(tok, args.requests, args.seed)
    workloads = {"base": [None], **{k: [None, *v] for k, v in adaptations.items()}}
    rows = []
    try:
        for name, kinds in workloads.items():
            asyncio.run(serve(engine, reqs[: 2 * len(kinds)], kinds))  # warm-up: every expert and bundle registered
            r = asyncio.run(serve(engine, reqs, kinds))
            r.update(workload=name)
            rows.append(r)
            print(f"{args.engine} {args.shape} {name}: {r['tok_s']:.0f} tok/s, ttft p50 {r['ttft_p50_s']:.3f} s",
                  flush=True)
            write_json(args.out, {**result, "rows": rows})  # partial results survive a timeout
    finally:
        sampler.__exit__()
        result["memory"] = {"device_peak_mb": sampler.mb,
                            "torch_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.engine == "native" else None}
        result["rows"] = rows
        write_json(args.out, result)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return result


def summarize(paths: list[str], out: str | None) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows, by = [], {}
    for r in runs:
        for w in r.get("rows", []):
            by[(r["engine"], r["shape"], w["workload"])] = w
            rows.append({"engine": r["engine"], "shape": r["shape"], "workload": w["workload"],
                         "tok_s": w["tok_s"], "seconds": w["seconds"], "ttft_p50_s": w["ttft_p50_s"],
                         "ttft_p90_s": w["ttft_p90_s"], "device_peak_mb": r.get("memory", {}).get("device_peak_mb")})
    print_table(rows, ["engine", "shape", "workload", "tok_s", "seconds", "ttft_p50_s", "ttft_p90_s", "device_peak_mb"])
    goals = {}
    n, v = by.get(("native", "llama3-8b", "mixed")), by.get(("vllm", "llama3-8b", "mixed"))
    print()
    if v and n:
        goals["vllm_over_native_8b_mixed"] = v["tok_s"] / n["tok_s"]
        print(f"vLLM / native, 8B mixed: {v['tok_s'] / n['tok_s']:.2f}x (goal >= 3)")
    for shape in ("llama3-8b", "smollm2"):
        m, b = by.get(("vllm", shape, "mixed")), by.get(("vllm", shape, "base"))
        if m and b:
            goals[f"vllm_mixed_overhead_{shape}"] = 1 - m["tok_s"] / b["tok_s"]
            print(f"vLLM mixed-adaptation overhead vs its base, {shape}: {100 * (1 - m['tok_s'] / b['tok_s']):.1f}% "
                  "(goal <= 20%)")
    summary = {"rows": rows, "goals": goals, "runs": paths,
               "vllm_start_s": {r["shape"]: r["start_s"] for r in runs if "start_s" in r}}
    write_json(out, summary)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["native", "vllm"])
    ap.add_argument("--shape", choices=["smollm2", "llama3-8b"], default="smollm2")
    ap.add_argument("--model", help="SmolLM2 Hugging Face folder (its tokenizer serves the 8B shape too)")
    ap.add_argument("--requests", type=int, default=256,
                    help="requests per workload (64 made runs of ~2 s on vLLM, too short to compare)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together, both engines")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--gpu-memory", type=float, default=0.8, help="vLLM's share of the GPU memory")
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    ap.add_argument("--sapt-bank", type=int, default=64, help="the rows engine's SAPT bank width (vllm_sapt_bank)")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="--rows: timed runs of each workload (the median is kept)")
    ap.add_argument("--prompts", choices=["windows", "distinct"], default="windows",
                    help="--rows: windows of one text (shared prefixes) or random tokens (none shared)")
    ap.add_argument("--rows", action="store_true",
                    help="stock vLLM's base workload, then the rows engine's base and unique workloads, in one run")
    ap.add_argument("--summarize", nargs="+", metavar="RUN_JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.out)
        return
    if args.model is None:
        args.model = str(resolve_model_folder(None, default_cache_dir())[0])  # the embedded SmolLM2
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU")
    if args.rows or args.engine is None:  # no arguments: the rows comparison on the embedded model
        run_rows(args)
        return
    run(args)


if __name__ == "__main__":
    main()
