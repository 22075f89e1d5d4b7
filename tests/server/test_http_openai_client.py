"""The official `openai` Python client against the live server: completions, chat, streaming, usage,
n > 1, batches, seeds and stop strings."""
from __future__ import annotations

import openai
import pytest

from tests.support.live import MODEL


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_greedy_is_deterministic_and_matches_token_id_prompt(client, server):
    ids = server.engine.tokenizer.encode("Hello there")
    by_text = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi!"}],
                                       max_completion_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_chat_template(client, server):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(server.engine.tokenizer.encode(expected, add_special_tokens=False))


def test_streamed_completion_equals_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streamed_chat_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
                                            max_tokens=15, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}],
                                           max_tokens=15, temperature=0)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seeds(client):
    kw = dict(model=MODEL, prompt="The weather today", max_tokens=12, temperature=1.0, seed=123)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same text
    assert len({c.text for c in a.choices}) > 1  # each choice gets its own seed (seed + i)
    assert a.usage.completion_tokens == 36
    single = client.completions.create(n=1, **kw)
    assert single.choices[0].text == a.choices[0].text


def test_batch_of_prompts_with_n(client):
    prompts = ["One", "Two words"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert r.choices[2 * p].text == r.choices[2 * p + 1].text == alone.choices[0].text


def test_streamed_n_choices(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", n=2, max_tokens=6, temperature=0,
                                            stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts[0] == texts[1] and texts[0]


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"


def test_concurrent_requests_equal_sequential_ones(client):
    """Requests that share engine steps (continuous batching) answer as they would alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request number {i} says" + " more" * (i * 7) for i in range(8)]

    def ask(i: int) -> str:
        if i % 2:
            chunks = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=10 + i, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=10 + i,
                                         temperature=0).choices[0].text

    alone = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert together == alone


def test_fields_clients_send_by_default_are_accepted_and_ignored(client, server):
    # What the openai SDK passes through when asked to (store, metadata, user, service_tier ...), and extra keys
    # a client may add: none changes the answer.
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                           temperature=0)
    extra = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, store=False,
        metadata={"team": "x"}, user="u-1", service_tier="auto", parallel_tool_calls=True,
        extra_body={"temprature": 1.5, "some_future_field": {"a": 1}})
    assert extra.choices[0].message.content == plain.choices[0].message.content
    # LangChain's ChatOpenAI default payload (langchain-openai, recorded): model, messages, stream, n, temperature
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                 "stream": False, "n": 1, "temperature": 0.7, "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_penalties_bias_and_token_controls_through_the_sdk(client):
    base = dict(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    forced = client.completions.create(**base, logit_bias={"42": 100})
    ids = client.completions.create(**base, extra_body={"logit_bias": {"42": 100}, "ignore_eos": True})
    assert forced.choices[0].text == ids.choices[0].text and forced.usage.completion_tokens == 6
    plain = client.completions.create(**base)
    penal = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0)
    assert penal.usage.completion_tokens >= 1 and plain.usage.completion_tokens >= 1
    # stop_token_ids: the token forced by the bias ends the sequence at once
    stopped = client.completions.create(**base, logit_bias={"42": 100}, extra_body={"stop_token_ids": [42]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    # min_tokens: with EOS forced, nothing ends before 4 tokens
    eos = client.completions.create(**base, extra_body={"min_tokens": 4, "stop_token_ids": [42],
                                                        "logit_bias": {"42": 100}, "ignore_eos": True})
    assert eos.usage.completion_tokens == 5 and eos.choices[0].finish_reason == "stop"


def test_stop_reason_include_stop_str_and_special_tokens(client, server):
    base = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    plain = client.completions.create(**base)
    text = plain.choices[0].text
    assert plain.choices[0].model_extra["stop_reason"] is None  # ended by length
    stop = text[3:6]
    cut = client.completions.create(**base, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(**base, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.find(stop)] + stop
    by_id = client.completions.create(**base, logit_bias={"42": 100}, extra_body={"stop_token_ids": [42]})
    assert by_id.choices[0].model_extra["stop_reason"] == 42
    eos = server.engine.eos_token_ids[0]
    special = server.engine.tokenizer.decode([eos])
    raw = client.completions.create(**base, logit_bias={str(eos): 100},
                                    extra_body={"ignore_eos": True, "skip_special_tokens": False, "max_tokens": 2})
    assert special and raw.choices[0].text == special * 2
    skipped = client.completions.create(**base, logit_bias={str(eos): 100}, extra_body={"ignore_eos": True,
                                                                                          "max_tokens": 2})
    assert special not in skipped.choices[0].text
