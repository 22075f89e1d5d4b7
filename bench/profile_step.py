"""Profile one engine decode step against a plain Hugging Face forward with its own cache (same batch,
same context length): wall time per step and the top operators by host time. A diagnostic, not a benchmark.

    python bench/profile_step.py [--model FOLDER] [--device cuda] [--batch 32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import sync  # noqa: E402
from engine.contract import GenerationRequest, SamplingParams  # noqa: E402
from engine.native.llm_engine import EngineConfig, LLMEngine  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="Hugging Face folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from engine.loader import resolve_model_folder
    from engine.spec import default_cache_dir

    args.model = str(resolve_model_folder(args.model, default_cache_dir())[0])
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    B, L = args.batch, args.context
    eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=B, max_model_len=L + 4 * args.steps + 8))
    for i in range(B):
        eng.add_request(GenerationRequest(str(i), list(range(1000, 1000 + L)),
                                          SamplingParams(max_tokens=4 * args.steps, temperature=0, ignore_eos=True)))
    eng.step()
    ids = torch.randint(1000, 2000, (B, L), device=dev)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def hf_step():
        nonlocal pkv, nxt
        with torch.no_grad():
            o = model(nxt, past_key_values=pkv, use_cache=True)
            pkv, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            nxt.tolist()

    for name, fn in (("engine step", eng.step), ("hf forward", hf_step)):
        fn()
        sync(dev)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(dev)
        print(f"{name}: {1000 * (time.perf_counter() - t) / args.steps:.1f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for name, fn in (("engine step", eng.step), ("hf forward", hf_step)):
        with profile(activities=acts) as prof:
            for _ in range(5):
                fn()
            sync(dev)
        print(f"--- {name}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
