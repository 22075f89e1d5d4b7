"""Log-probabilities through the openai SDK: chat (logprobs, top_logprobs) and completions (integer logprobs),
whole and streamed, against the model's own log-softmax computed here. A streamed request and a whole one are
prefilled in different batches, so their float32 values agree to 1e-5 (2.4e-6 apart seen), not bit for bit."""
from __future__ import annotations

import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.live import MODEL


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def greedy_reference(tiny_llama_dir, prompt: str, n: int) -> tuple[list[int], list[float]]:
    """The plain Hugging Face model's n greedy tokens after ``prompt`` and their log-probabilities."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    seq, lps = tok(prompt).input_ids, []
    with torch.no_grad():
        for _ in range(n):
            lp = model(torch.tensor([seq])).logits[0, -1].log_softmax(-1)
            t = int(lp.argmax())
            lps.append(float(lp[t]))
            seq.append(t)
    return seq[-n:], lps


def test_completion_logprobs_match_the_model_and_the_stream(client, tiny_llama_dir):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    ids, want = greedy_reference(tiny_llama_dir, prompt, 6)
    assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
    for pos, chosen in zip(lp.top_logprobs, lp.token_logprobs):  # greedy: the chosen token is the most likely
        vals = list(pos.values())
        assert len(pos) <= 3 and vals == sorted(vals, reverse=True) and abs(chosen - vals[0]) < 1e-5
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                       stream=True)
    got = [x for chunk in stream for c in chunk.choices if c.logprobs for x in c.logprobs.token_logprobs]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs_and_top_logprobs_whole_and_streamed(client):
    msgs = [{"role": "user", "content": "Say hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(c.token for c in content) == \
        r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert abs(c.logprob - c.top_logprobs[0].logprob) < 1e-5 and bytes(c.bytes).decode() == c.token
        assert math.isfinite(c.logprob)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [x.logprob for ch in stream for c in ch.choices if c.logprobs and c.logprobs.content
                for x in c.logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_echo_puts_the_prompt_and_its_logprobs_first_whole_and_streamed(client, tiny_llama_dir):
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tok(prompt).input_ids
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [None] + [float(lp[j - 1, t]) for j, t in enumerate(ids) if j > 0]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt + plain.choices[0].text
    lps = c.logprobs
    n = len(ids)
    assert len(lps.tokens) == n + 4 and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:n] == pytest.approx(want[1:], abs=1e-4)
    assert all(len(t) <= 2 for t in lps.top_logprobs[1:]) and lps.text_offset[n] == len("".join(lps.tokens[:n]))
    echo_only = client.completions.create(model=MODEL, prompt=[prompt, "Hi"], max_tokens=2, temperature=0, echo=True)
    assert [x.text[: len(p)] for x, p in zip(echo_only.choices, [prompt, "Hi"])] == [prompt, "Hi"]
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                       logprobs=2, stream=True)
    chunks = [ch for ch in stream if ch.choices]
    assert chunks[0].choices[0].text == prompt and "".join(ch.choices[0].text for ch in chunks) == c.text
    got = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert got[1:] == pytest.approx(lps.token_logprobs[1:], abs=1e-5) and got[0] is None
