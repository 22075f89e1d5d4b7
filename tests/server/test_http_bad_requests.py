"""Every bad input gets its 4xx in the OpenAI error shape, naming the field, and the server keeps serving."""
from __future__ import annotations

import pytest

from tests.support.live import MAX_MODEL_LEN, MODEL, assert_error_shape

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

# (route, JSON body, status, param, code or None)
BAD_BODIES = [
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "temperature": -0.1}, 400, "temperature", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "n": 9}, 400, "n", "invalid_value"),  # above max_n (8)
    (COMPLETIONS, {"prompt": "x", "stop": ["a"] * 17}, 400, "stop", "invalid_value"),  # above max_stop (16)
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": ["ok", ""]}, 400, "prompt.1", "invalid_value"),
    (COMPLETIONS, {"prompt": [[]]}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": {"text": "x"}}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"max_tokens": 5}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": "hello " * (MAX_MODEL_LEN + 10)}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3.0}, 400, "presence_penalty", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1.0}}, 400, "logit_bias", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101.0}}, 400, "logit_bias", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"99999999": 1.0}}, 400, "logit_bias", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"\u00b2": 1.0}}, 400, "logit_bias", "invalid_value"),  # "²".isdigit()
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"9" * 5000: 1.0}}, 400, "logit_bias", "invalid_value"),
    # Every token an end token before min_tokens: nothing is left to generate.
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": list(range(49152)), "min_tokens": 2}, 400, "stop_token_ids",
     "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-3]}, 400, "stop_token_ids", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0.0}, 400, "repetition_penalty", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "guided_json": {"type": "nope"}}, 400, "guided_json", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "guided_regex": "(a"}, 400, "guided_regex", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "guided_choice": []}, 400, "guided_choice", "invalid_value"),
    (COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "structured_outputs",
     "invalid_value"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions", "invalid_value"),
    (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content", "invalid_value"),
    (CHAT, {"messages": USER, "top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
     "tools.0.function.name", "invalid_value"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"}, 400,
     "tool_choice", "invalid_value"),
    (CHAT, {"messages": USER, "max_completion_tokens": MAX_MODEL_LEN}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    (CHAT, {"messages": USER, "model": "nope"}, 404, "model", "model_not_found"),
    # Earlier assistant turns whose tool calls are malformed.
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [{"function": "f"}]}]}, 400,
     "messages.1.tool_calls.0.function", "invalid_value"),
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     400, "messages.1.tool_calls.0.function.arguments", "invalid_value"),
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     400, "messages.1.tool_calls.0.function.arguments", "invalid_value"),
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}, 400,
     "messages.1.tool_calls.0.function.name", "invalid_value"),
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": ["f"]}]}, 400, "messages.1.tool_calls.0",
     "invalid_value"),
    (CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}]}]},
     400, "messages.1.tool_calls.0.function.arguments", "invalid_value"),
]


def assert_still_serving(server) -> None:
    with server.client() as c:
        r = c.post(COMPLETIONS, json={"model": MODEL, "prompt": "still there?", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("route,body,status,param,code", BAD_BODIES,
                         ids=[f"{r.rsplit('/', 1)[-1]}-{p}-{i}" for i, (r, _, _, p, _) in enumerate(BAD_BODIES)])
def test_bad_body(server, route, body, status, param, code):
    with server.client() as c:
        err = assert_error_shape(c.post(route, json=body), status)
    assert err["param"] == param and err["code"] == code
    assert param.split(".")[0] in err["message"] or code == "model_not_found"
    assert_still_serving(server)


@pytest.mark.parametrize("content,headers,needle", [
    (b'{"prompt": "x", ', {"content-type": "application/json"}, "Malformed JSON"),
    (b"not json at all", {"content-type": "application/json"}, "Malformed JSON"),
    (b"[1, 2]", {"content-type": "application/json"}, "JSON object"),
    (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, "JSON object"),
    (b"", {"content-type": "application/json"}, "missing"),
])
def test_malformed_body(server, content, headers, needle):
    with server.client() as c:
        err = assert_error_shape(c.post(COMPLETIONS, content=content, headers=headers), 400)
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    assert_still_serving(server)


def test_unknown_route_and_method(server):
    with server.client() as c:
        assert assert_error_shape(c.get("/v1/nothing"), 404)["type"] == "not_found_error"
        assert_error_shape(c.get(COMPLETIONS), 405)
        assert_error_shape(c.get("/v1/models/other-model"), 404)


def test_streaming_request_errors_before_the_stream(server):
    """A bad streaming request gets its status code, not a 200 with an error event."""
    with server.client() as c:
        err = assert_error_shape(c.post(COMPLETIONS, json={"prompt": "hello", "stream": True,
                                                           "max_tokens": MAX_MODEL_LEN}), 400)
    assert err["code"] == "context_length_exceeded"
    assert_still_serving(server)
