"""Penalties, logit bias, min_p and min_tokens: the batched processing against a plain per-row computation,
and through the engine: a processed row changes alone, the other rows give their solo tokens."""
from __future__ import annotations

import torch

from engine.contract import GenerationRequest, SamplingParams
from engine.native.llm_engine import EngineConfig, LLMEngine
from engine.native.sampling import min_p_filter, process_logits


def reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], ends: list[int]):
    """One row, token by token, as the OpenAI and vLLM docs state the rules."""
    row = row.clone().double()
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in p.logit_bias.items():
        row[t] += b
    if len(output) < p.min_tokens:
        for t in ends:
            row[t] = float("-inf")
    return row.float()


def test_processing_matches_the_rules_row_by_row_and_leaves_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=g) * 3
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25,
                             logit_bias={4: 5.0, 7: -100.0}),
              SamplingParams(),
              SamplingParams(min_tokens=3, frequency_penalty=-0.5)]
    prompts, outputs, ends = [[1, 2, 3], [5], [2, 2]], [[3, 3, 9], [1], [4, 4]], [[0, 19], [0], [0, 4]]
    rows = [(i, params[i], prompts[i], outputs[i], ends[i]) for i in (0, 2)]
    got = process_logits(logits, rows)
    for i in (0, 2):
        torch.testing.assert_close(got[i], reference(logits[i], params[i], prompts[i], outputs[i], ends[i]))
    assert torch.equal(got[1], logits[1])
    kept = min_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), torch.tensor([0.2]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]  # 0.05 < 0.2 * 0.5


def test_a_batch_of_mixed_rows_matches_the_rules_row_by_row():
    """The batched scatters against the per-row rules on 24 rows of random settings (some rows untouched)."""
    import random

    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    B, V = 24, 50
    logits = torch.randn(B, V, generator=g) * 4
    rows, want = [], logits.clone()
    for i in range(B):
        if i % 5 == 4:
            continue  # not processed: must stay as it is
        p = SamplingParams(repetition_penalty=rng.choice([1.0, 1.2, 0.8]), frequency_penalty=rng.choice([0, 0.5, -1]),
                           presence_penalty=rng.choice([0, 0.3]), min_tokens=rng.choice([0, 5]),
                           logit_bias={t: rng.uniform(-5, 5) for t in rng.sample(range(V), rng.choice([0, 1, 3]))})
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 8))]
        output = [rng.randrange(V) for _ in range(rng.randrange(0, 8))]  # repeats included
        ends = rng.choice([[], [0], [0, 49]])
        rows.append((i, p, prompt, output, ends))
        want[i] = reference(logits[i], p, prompt, output, ends)
    torch.testing.assert_close(process_logits(logits, rows), want)


def test_a_processed_row_changes_alone_in_a_batch(tiny_model, tiny_llama_dir):
    from transformers import AutoTokenizer

    model, tok = tiny_model, AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tok("The capital of France is").input_ids

    def run(reqs):
        eng = LLMEngine(model, tok, EngineConfig(max_num_seqs=4, max_model_len=128))
        for r in reqs:
            eng.add_request(r)
        out: dict = {}
        while eng.has_work:
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return out

    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    solo = run([GenerationRequest("a", prompt, plain)])["a"]
    forced = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
    penal = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    both = run([GenerationRequest("a", prompt, plain), GenerationRequest("f", prompt, forced),
                GenerationRequest("p", prompt, penal)])
    assert both["a"] == solo  # the plain row is untouched by its neighbours' processing
    assert both["f"] == [42] * 8
    assert len(set(both["p"])) == 8  # every token penalised once used: no repeats
