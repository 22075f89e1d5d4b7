"""Every request its own exact adaptation inside vLLM (rows mode), CUDA graphs on, against the native engine's
merged-weight reference for each row alone (skipped without CUDA or vLLM; comparison in tests.support.gpu_ref).
"""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from tests.support.gpu_ref import agreement, gaps, generate, record, sapt, sapt_bundle

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("vllm")),
                                reason="needs a CUDA GPU and vLLM")

ROWS = 64


@pytest.fixture(scope="module")
def rows_engine(folder, ref):
    from engine.vllm.engine import VLLMEngine, VLLMOptions

    t0 = time.time()
    opts = VLLMOptions(model=folder, served_name="smollm2", cache_dir=ref.cache, dtype="bfloat16", adapt_targets="all",
                       max_model_len=1024, max_num_seqs=64, gpu_memory_utilization=0.3, enforce_eager=False,
                       sapt_bank=64)
    eng = VLLMEngine.from_options(opts)
    record("rows_engine_start", seconds=round(time.time() - t0, 1), info=eng.rows_info)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def stock_engine(folder, ref, rows_engine):
    """vLLM without any adaptation machinery (no hooks, no extension): what base rows must equal."""
    from engine.vllm.engine import VLLMEngine, VLLMOptions

    opts = VLLMOptions(model=folder, served_name="smollm2", cache_dir=ref.cache, dtype="bfloat16", adapt_targets="none",
                       max_model_len=1024, max_num_seqs=64, gpu_memory_utilization=0.2, enforce_eager=False,
                       skeleton=False)
    eng = VLLMEngine.from_options(opts)
    yield eng
    eng.close()


def experts():
    """The 4 SVF experts shipped for SmolLM2 (trained, MLP): what mixtures are made of in use. (Random experts
    strong enough to change every token make the model chaotic: bf16 rounding alone then moves the native
    engine's own tokens away from its float32 ones, and no bf16 engine can be held to them.)"""
    from pathlib import Path

    from experts.store.expert_file import read_expert_file
    from tests.support import REPO_ROOT

    root = Path(REPO_ROOT) / "experts" / "builtin"
    return [read_expert_file(root / f"{n}.safetensors")[0] for n in ("gsm8k", "mbpp", "arc-easy-text", "classifier")]


def batch(ref, seed: int):
    """ROWS rows: 40 distinct SVF mixtures (random α over 4 experts), 16 distinct SAPT attentions, 8 base."""
    from adapters import Adaptation

    g = torch.Generator().manual_seed(1000 + seed)
    es = experts()
    bundle = sapt_bundle(ref)
    kinds = []
    for i in range(40):
        alpha = torch.rand(4, generator=g) * 1.5
        kinds.append(Adaptation.mixture(list(zip(es, alpha.tolist())), label=f"mix{i}"))
    for i in range(16):
        kinds.append(sapt(bundle, torch.softmax(2 * torch.randn(4, generator=g), 0).tolist(), f"sapt{i}"))
    kinds += [None] * (ROWS - len(kinds))
    return [(ref.prompts[i % len(ref.prompts)], a) for i, a in enumerate(kinds)]


@pytest.mark.parametrize("seed", [1, 2])  # the second batch reuses the first one's request slots
def test_a_batch_of_64_distinct_adaptations_gives_every_row_its_own_reference_tokens(rows_engine, ref, seed):
    rows = batch(ref, seed)
    t0 = time.time()
    got = generate(rows_engine, rows)
    seconds = time.time() - t0
    res = agreement(ref, rows, got)
    adapted = [i for i, (_, a) in enumerate(rows) if a is not None]
    # the adaptations are real: their tokens are far from the base model's greedy path
    unadapted = max(max(gaps(ref, rows[i][0], got[i])) for i in adapted)
    kinds = {"svf": [i for i in adapted if rows[i][1].svf is not None],
             "sapt": [i for i in adapted if rows[i][1].sapt is not None],
             "base": [i for i, (_, a) in enumerate(rows) if a is None]}
    per_kind = {k: agreement(ref, [rows[i] for i in idx], [got[i] for i in idx]) for k, idx in kinds.items()}
    distinct = len({tuple(got[i]) for i in adapted if rows[i][0] == ref.prompts[0]})
    record(f"rows_batch_seed{seed}", result=res, per_kind=per_kind, base_reference_gap_of_adapted_tokens=unadapted,
           distinct_outputs_prompt0=distinct, seconds=round(seconds, 2), stats=rows_engine.stats())
    assert res["ok"], res
    assert unadapted > 1.0


def test_base_rows_in_an_adapted_batch_equal_vllm_without_adaptation(rows_engine, stock_engine, ref):
    """Base rows run through U diag(σ) Vᵀ in bf16 (W to rounding), stock vLLM through W: each row's tokens equal
    stock's up to their first difference, which must be a near-tie (both picks within 0.5 nats of the
    reference's best at that position): the difference of two roundings, not of two models."""
    rows = batch(ref, 3)
    got = generate(rows_engine, rows)
    base = [i for i, (_, a) in enumerate(rows) if a is None]
    stock = generate(stock_engine, [(rows[i][0], None) for i in base])
    same = sum(got[i] == s for i, s in zip(base, stock))
    splits = []
    for i, s in zip(base, stock):
        p = next((k for k, (a, b) in enumerate(zip(got[i], s)) if a != b), None)
        if p is not None:
            prompt = rows[i][0]
            splits.append({"row": i, "position": p, "rows_gap": gaps(ref, prompt, got[i][:p + 1])[p],
                           "stock_gap": gaps(ref, prompt, s[:p + 1])[p]})
    res = agreement(ref, [rows[i] for i in base], [got[i] for i in base])
    stock_res = agreement(ref, [rows[i] for i in base], stock)
    record("rows_base_vs_stock", exact_sequences=same, rows=len(base), first_differences=splits, rows_engine=res,
           stock_engine=stock_res)
    assert res["ok"] and stock_res["ok"]
    assert all(d["rows_gap"] <= 0.5 and d["stock_gap"] <= 0.5 for d in splits), splits


def test_the_hook_points_are_the_ones_the_rows_were_written_against():
    from engine.vllm.rows_worker import check_hook_points

    check_hook_points()  # raises on another vLLM version or moved hook points
