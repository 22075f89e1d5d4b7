"""What one row's grammar mask costs on the host, per grammar engine: xgrammar (the native engine's, and vLLM's
other backend) against llguidance (the vLLM engine's default), measured in the same run. vLLM 0.25 fills
every constrained row's mask on the host between two GPU steps, so this time adds to each step.

The JSON schema of bench/sampling_features.py, compact JSON; ``--rows`` matchers each walk the grammar by
tokens drawn uniformly from their mask (a fresh matcher when a document ends), ``--steps`` steps; the
tokenizer of the embedded SmolLM2 in a vocabulary of ``--vocab`` entries (128,256: the Llama-3-8B shape the
vLLM benchmarks use). One thread. Reports microseconds per row's mask, peak RSS and peak GPU memory (none).

    python bench/grammar_masks.py [--rows 256] [--steps 30] [--vocab 128256] [--out results/grammar_masks.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import report_host_only  # noqa: E402
from bench.sampling_features import SCHEMA  # noqa: E402


def walk(name: str, make, fill, accept, done, alloc, rows: int, steps: int, vocab: int, n_tok: int, seed: int):
    """Seconds spent filling masks, over ``steps`` steps of ``rows`` matchers."""
    rng = random.Random(seed)
    matchers = [make() for _ in range(rows)]
    bitmask = alloc(rows)
    spent = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            fill(m, bitmask, i)
        spent += time.perf_counter() - t0
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        for i, m in enumerate(matchers):
            allowed = np.flatnonzero(bits[i][:n_tok])
            accept(m, int(rng.choice(allowed)) if len(allowed) else int(np.flatnonzero(bits[i])[0]))
            if done(m):
                matchers[i] = make()
        print(f"{name}: step {step + 1}/{steps}", end="\r", flush=True)
    print()
    return spent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=128256, help="the model's vocabulary (masks are this wide)")
    ap.add_argument("--model", default=None, help="Hugging Face folder whose tokenizer is used (default: SmolLM2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from engine.loader import embedded_gguf_path, gguf_to_hf_folder
    from engine.spec import default_cache_dir

    torch.set_num_threads(1)
    folder = args.model or str(gguf_to_hf_folder(embedded_gguf_path(), default_cache_dir()))
    tok = AutoTokenizer.from_pretrained(folder)
    V, schema = args.vocab, SCHEMA.value
    engines = {}
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)).compile_json_schema(
        schema, any_whitespace=False)
    engines["xgrammar"] = (lambda: xgr.GrammarMatcher(compiled), lambda m, b, i: m.fill_next_token_bitmask(b, i),
                           lambda m, t: m.accept_token(t), lambda m: m.is_terminated(),
                           lambda n: xgr.allocate_token_bitmask(n, V))
    if importlib.util.find_spec("llguidance") is not None:  # installed with vLLM
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt

        lltok = llguidance.hf.from_tokenizer(tok, V)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        engines["llguidance"] = (lambda: llguidance.LLMatcher(lltok, grammar),
                                 lambda m, b, i: llt.fill_next_token_bitmask(m, b, i),
                                 lambda m, t: m.consume_token(t), lambda m: m.is_stopped(),
                                 lambda n: llt.allocate_token_bitmask(n, lltok.vocab_size))
    else:
        print("llguidance is not installed (it comes with vLLM): xgrammar alone")
    rows = []
    for name, fns in engines.items():
        seconds = walk(name, *fns, rows=args.rows, steps=args.steps, vocab=V, n_tok=len(tok), seed=args.seed)
        rows.append({"engine": name, "us_per_mask": seconds / (args.rows * args.steps) * 1e6,
                     "ms_per_step": seconds / args.steps * 1e3})
    for r in rows:
        r["vs_xgrammar"] = rows[0]["us_per_mask"] / r["us_per_mask"]
    report_host_only(args, rows, ["engine", "us_per_mask", "ms_per_step", "vs_xgrammar"])


if __name__ == "__main__":
    main()
