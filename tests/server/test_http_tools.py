"""Tools through the openai SDK: required and named calls (enforced by the grammar engine) come back parsed,
whole and streamed; a conversation with the call and the tool's answer goes on; auto finds calls in text."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import openai
import pytest

from server.api.tools import parse_calls, render_messages
from server.schemas import ChatCompletionRequest
from tests.support.live import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def weather_args(call) -> dict:
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Rome") and args["unit"] in ("C", "F")
    return args


def test_a_required_call_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER, TIME], tool_choice="none",
                                        max_tokens=8, temperature=0)
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].message.content


def test_a_named_call_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=60, temperature=1.0, seed=3)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    args = weather_args(call)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                            max_tokens=60, temperature=1.0, seed=3, stream=True)
    name, parts, ids, reasons = None, [], set(), []
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                ids.add(d.id)
                name = d.function.name or name
                parts.append(d.function.arguments or "")
            reasons.append(c.finish_reason)
    assert name == "get_weather" and json.loads("".join(parts)) == args and reasons[-1] == "tool_calls"
    assert len(ids - {None}) == 1


def test_bad_tool_choices_are_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "missing"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"})


def test_auto_finds_calls_in_the_text_and_keeps_the_rest():
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER, TIME]})
    content, calls = parse_calls(body, 'Sure.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}'
                                       '</tool_call>')
    assert content == "Sure." and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"zone": "UTC"}
    assert parse_calls(body, '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')[1] == []
    assert parse_calls(body, "plain answer") == ("plain answer", [])


# Answers a backtracking pattern takes seconds on (its time grows as the cube of the whitespace after an
# opening tag), and others a JSON scanner could stumble on; each parses in milliseconds.
HOSTILE_ANSWERS = {
    "whitespace after a tag": "<tool_call>" + ("\n" + " " * 80) * 47,
    "tags and whitespace": ("<tool_call>" + " " * 80) * 2000,
    "braces": "<tool_call>" + "{" * 4000 + "</tool_call>",
    "brackets too deep to parse": "<tool_call>" + "[" * 100_000 + "</tool_call>",
    "arguments too deep to parse": '<tool_call>{"name": "get_time", "arguments": ' + "[" * 100_000 + "}</tool_call>",
}


@pytest.mark.parametrize("name", HOSTILE_ANSWERS)
def test_auto_parses_hostile_answers_in_milliseconds(name):
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER, TIME]})
    text = HOSTILE_ANSWERS[name]
    t0 = time.perf_counter()
    content, calls = parse_calls(body, text)
    assert time.perf_counter() - t0 < 0.05
    assert (content, calls) == (text, [])


def test_auto_pairs_each_closing_tag_with_the_nearest_opening_one():
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER, TIME]})
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    content, calls = parse_calls(body, "a <tool_call> b " + call + " c " + call + " <tool_call> d")
    assert content == "a <tool_call> b  c  <tool_call> d" and [c.function.name for c in calls] == ["get_time"] * 2


def test_a_whitespace_answer_does_not_hold_up_other_clients(server):
    """The model answers an opening tag and then 43 tokens of 81 whitespace characters each (the regular
    expression forces the tag, the bias the whitespace): the answer comes at once, and /health answers
    meanwhile at least once a second. (The gaps between answers are measured, not each answer's time: the
    server shares this process, so a stall that holds the interpreter stops the prober's clock too.)"""
    tok = server.engine.tokenizer
    blank = [(len(s), i) for i in range(len(tok)) if (s := tok.decode([i])) and not s.strip()]
    widest = max(blank)[1]
    answered, done = [time.monotonic()], threading.Event()

    def probe():
        with server.client() as c:
            while not done.is_set():
                assert c.get("/health").status_code == 200
                answered.append(time.monotonic())
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with server.client() as c:
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "auto", "max_tokens": 48,
                "temperature": 0, "guided_regex": r"<tool_call>\s+", "logit_bias": {str(widest): 100}})
            took = time.monotonic() - t0
    finally:
        done.set()
        prober.join()
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"].startswith("<tool_call>") and len(message["content"]) > 3000
    assert message.get("tool_calls") is None
    gaps = [b - a for a, b in zip(answered, answered[1:] + [time.monotonic()])]
    assert took < 10 and max(gaps) < 1.0, (took, max(gaps))


def test_tools_reach_the_template_or_the_system_turn():
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER]})
    plain = SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    messages, kw = render_messages(body, plain)
    assert kw == {} and messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    aware = SimpleNamespace(chat_template="{% if tools %}{{ tools }}{% endif %}")
    messages, kw = render_messages(body, aware)
    assert kw["tools"][0]["function"]["name"] == "get_weather" and messages[0]["role"] == "user"
    none = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
    assert render_messages(none, plain) == ([{"role": "user", "content": ASK[0]["content"]}], {})
