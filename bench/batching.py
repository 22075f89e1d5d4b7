"""Engine benchmark: continuous batching vs Hugging Face `generate` in static batches.

A stream of N requests (mixed prompt lengths, max_tokens 16..128, all queued at t=0 in arrival order) is
served (a) by the engine and (b) by `generate` in static batches of 16 taken in arrival order, each batch
running until its longest request is done. A single request is also timed on both at batch 1.

    python bench/batching.py                      # SmolLM2 on this machine (fp32 CPU)
    python bench/batching.py --device cuda        # bf16 on a GPU
    python bench/batching.py --device cuda --shape llama3-8b   # random weights, Llama-3-8B shape
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Timer, machine, peak_gpu_mb, peak_rss_mb, print_table, write_json  # noqa: E402
from engine.contract import GenerationRequest, SamplingParams  # noqa: E402
from engine.native.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from engine.spec import default_cache_dir

TEXT = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology and includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. These concepts are implicit in concrete practices such as "
    "one-to-one correspondence, the basis of counting, and comparison to a standard, used for measurement. "
    "The earliest known tool for use in computation was the abacus, and it was thought to have been "
    "invented in Babylon circa 2400 BC. Its original style of usage was by lines drawn in sand with pebbles. "
) * 4


class ModuloTokenizer:
    """For random-weight models whose vocabulary is larger than the tokenizer's: decode ids modulo it."""

    def __init__(self, tok):
        self.tok, self.n = tok, len(tok)
        self.eos_token_id = None

    def decode(self, ids, **kw):
        return self.tok.decode([i % self.n for i in ids], **kw)


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.loader import embedded_gguf_path, gguf_to_hf_folder

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    folder = args.model or gguf_to_hf_folder(embedded_gguf_path(), default_cache_dir())
    tok = AutoTokenizer.from_pretrained(folder)
    if args.shape == "llama3-8b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, tie_word_embeddings=False)
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)  # build in the serving dtype: an fp32 copy of 8B would not be needed
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.config._attn_implementation = "sdpa"
        name, engine_tok = "random Llama-3-8B shape", ModuloTokenizer(tok)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
        name, engine_tok = Path(folder).name, tok
    model.eval().requires_grad_(False)
    return model, tok, engine_tok, name, device


def workload(tok, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    base = tok(TEXT).input_ids
    out = []
    for _ in range(n):
        plen = rng.choice([8, 16, 32, 64, 128, 256])
        start = rng.randrange(0, len(base) - plen)
        out.append((base[start : start + plen], rng.randint(16, 128)))
    return out


def run_engine(model, tok, reqs, max_num_seqs: int) -> tuple[float, int]:
    eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=512, max_prefill_tokens=2048))
    for i, (ids, mt) in enumerate(reqs):
        eng.add_request(GenerationRequest(str(i), ids, SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True)))
    tokens = 0
    with Timer(eng.device) as t:
        while eng.has_work:
            tokens += sum(len(o.token_ids) for o in eng.step())
    return t.seconds, tokens


def run_static(model, tok, reqs, batch: int, device) -> tuple[float, int]:
    """`generate` over static batches in arrival order; each batch runs to its longest max_tokens."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    useful = 0
    with Timer(device) as t:
        for b in range(0, len(reqs), batch):
            group = reqs[b : b + batch]
            L = max(len(ids) for ids, _ in group)
            ids = torch.full((len(group), L), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (p, _) in enumerate(group):  # left padding, as generate expects for decoder-only models
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=max(mt for _, mt in group), eos_token_id=None, pad_token_id=pad)
            useful += sum(mt for _, mt in group)
    return t.seconds, useful


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face folder (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["model", "llama3-8b"], default="model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--static-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--single-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_engine.json")
    args = ap.parse_args()

    model, tok, engine_tok, name, device = load(args)
    reqs = workload(tok, args.requests, args.seed)
    print(f"model: {name} on {device} ({next(model.parameters()).dtype}); {len(reqs)} requests, "
          f"prompt tokens {sum(len(p) for p, _ in reqs)}, new tokens {sum(m for _, m in reqs)}", flush=True)

    # Warm-up both paths (allocator, kernels) on a small slice.
    run_engine(model, engine_tok, reqs[:4], 4)
    run_static(model, tok, reqs[:4], 4, device)

    e_s, e_tok = run_engine(model, engine_tok, reqs, args.max_num_seqs)
    print(f"engine: {e_s:.2f} s", flush=True)
    s_s, s_tok = run_static(model, tok, reqs, args.static_batch, device)
    print(f"static generate: {s_s:.2f} s", flush=True)

    one = [(reqs[0][0], args.single_tokens)]
    e1_s, e1_tok = run_engine(model, engine_tok, one, 1)
    g1_s, g1_tok = run_static(model, tok, one, 1, device)

    rows = [
        {"case": f"{len(reqs)} requests", "baseline": f"generate, static batches of {args.static_batch}",
         "baseline_s": s_s, "engine_s": e_s, "engine_tok_s": e_tok / e_s, "baseline_tok_s": s_tok / s_s,
         "speedup": s_s / e_s},
        {"case": "single stream", "baseline": "generate, batch 1", "baseline_s": g1_s, "engine_s": e1_s,
         "engine_tok_s": e1_tok / e1_s, "baseline_tok_s": g1_tok / g1_s, "speedup": g1_s / e1_s},
    ]
    print()
    print_table(rows, ["case", "baseline", "baseline_s", "engine_s", "baseline_tok_s", "engine_tok_s", "speedup"])
    mem = {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(device)}
    gpu = "-" if mem["peak_gpu_mb"] is None else f"{mem['peak_gpu_mb']:.0f} MiB"
    print(f"\npeak RSS {mem['peak_rss_mb']:.0f} MiB; peak GPU memory {gpu}")
    print("goals: 64-request stream >= 1.5x static batching; single stream >= 0.9x generate")
    write_json(args.out, {"model": name, "device": str(device), "machine": machine(), "rows": rows, "memory": mem,
                          "args": vars(args)})


if __name__ == "__main__":
    main()
