"""Structured outputs through the openai SDK: response_format json_schema / json_object, vLLM's guided_* and
structured_outputs fields, streamed too; bad or conflicting structures are a 400 naming the field."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.engine.native.test_structured import SCHEMA, valid
from tests.support.live import MODEL

FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a cat"}],
                                          **{"max_tokens": 60, **kw})


def test_json_schema_whole_and_streamed(client):
    r = ask(client, response_format=FORMAT, temperature=0)
    assert r.choices[0].finish_reason == "stop" and valid(json.loads(r.choices[0].message.content))
    stream = ask(client, response_format=FORMAT, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_a_hundred_schema_requests_beside_free_ones_give_a_hundred_valid_documents(client):
    def constrained(i):
        return ask(client, response_format=FORMAT, temperature=1.0, seed=i).choices[0]

    def free(i):
        return ask(client, temperature=1.0, seed=i, max_tokens=20).choices[0]

    with ThreadPoolExecutor(16) as pool:
        docs = list(pool.map(constrained, range(100)))
        frees = list(pool.map(free, range(20)))
    assert sum(c.finish_reason == "stop" and valid(json.loads(c.message.content)) for c in docs) == 100
    assert all(c.finish_reason == "length" or c.message.content is not None for c in frees)


def test_vllm_fields_choice_regex_and_structured_outputs(client):
    r = ask(client, temperature=1.0, seed=1, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert r.choices[0].message.content in ("red", "green", "blue")
    r = ask(client, temperature=1.0, seed=2, extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{4}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", r.choices[0].message.content)
    r = ask(client, temperature=1.0, seed=3, extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].message.content in ("up", "down")
    r = client.completions.create(model=MODEL, prompt="A thing:", max_tokens=60, temperature=1.0, seed=4,
                                  extra_body={"guided_json": SCHEMA})
    assert valid(json.loads(r.choices[0].text))
    r = ask(client, temperature=1.0, seed=5, extra_body={"guided_grammar": 'root ::= "a" ("b" | "c")'})
    assert r.choices[0].message.content in ("ab", "ac")


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, None),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}}, None),
])
def test_bad_or_conflicting_structures_are_a_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, **kw)
    assert e.value.status_code == 400
    if param:
        assert e.value.body["param"] == param


def test_structures_the_grammar_engine_cannot_finish_are_a_400_and_the_server_goes_on(client):
    from tests.engine.native.test_structured import STUCK

    with pytest.raises(openai.BadRequestError) as e:  # a choice: found when it is checked, before any step
        ask(client, extra_body={"guided_choice": ["yes", STUCK]})
    assert e.value.body["param"] == "guided_choice" and "choice 1" in e.value.body["message"]
    # a pattern: found at the step where no token is allowed (after "a"): a 400, or in a stream that has begun,
    # the error event
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, extra_body={"guided_regex": STUCK})
    assert e.value.body["code"] == "structure_dead_end" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIError) as e:
        list(ask(client, stream=True, extra_body={"guided_regex": STUCK}))
    assert e.value.body["code"] == "structure_dead_end", e.value.body
    assert ask(client, max_tokens=4).choices[0].message.content is not None
