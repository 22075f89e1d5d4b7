"""What one request's structure may cost the server: its size is refused before anything compiles, its compile
has a time limit (in the grammar engine's own pool, so other requests go on), and an ambiguous grammar whose
per-token cost grows ends alone instead of holding its batch back."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.live import assert_error_shape, serve

# Ambiguous: every run of letters splits into words in exponentially many ways; the grammar engine's mask
# costs ~0.2 s a token for SmolLM2's vocabulary (and grows with the text for others).
AMBIGUOUS = 'root ::= (a | b)*\na ::= [a-z]+\nb ::= [a-z]+ " "?'


@pytest.fixture(scope="module")
def srv(tiny_settings):
    with serve(tiny_settings(max_num_seqs=4, grammar_compile_seconds=0.3, max_structure_choices=1000)) as s:
        yield s


def post(c: httpx.Client, **body) -> httpx.Response:
    return c.post("/v1/completions", json={"prompt": "Say", "max_tokens": 4, "temperature": 0, **body}, timeout=120)


def test_ten_thousand_choices_are_refused_at_once(srv):
    with srv.client() as c:
        t0 = time.monotonic()
        err = assert_error_shape(post(c, guided_choice=[f"option {i}" for i in range(10_000)]), 400)
        assert time.monotonic() - t0 < 1.0
        assert err["param"] == "guided_choice" and "at most 1000" in err["message"]
        err = assert_error_shape(post(c, guided_regex="a" * 100_001), 400)
        assert "at most 100000" in err["message"]


def test_an_ambiguous_grammar_ends_alone_without_holding_its_neighbour_back(srv):
    with srv.client() as c:
        post(c, max_tokens=2)  # warm
        t0 = time.monotonic()
        alone = post(c, prompt="Once upon a time", max_tokens=160, ignore_eos=True)
        alone_s = time.monotonic() - t0
        assert alone.status_code == 200
        with ThreadPoolExecutor(2) as pool:
            amb = pool.submit(post, c, prompt="Say", max_tokens=200, guided_grammar=AMBIGUOUS, ignore_eos=True)
            time.sleep(0.05)
            t0 = time.monotonic()
            beside = post(c, prompt="Once upon a time", max_tokens=160, ignore_eos=True)
            beside_s = time.monotonic() - t0
            err = assert_error_shape(amb.result(), 400)
        assert err["code"] == "structure_too_costly" and "simplify the grammar" in err["message"]
        assert beside.json()["choices"][0]["text"] == alone.json()["choices"][0]["text"]
        # the neighbour pays only the step that finds the grammar far over its budget (~0.2 s of one mask here):
        # within 1.5x for a neighbour of a second or more, one such step for a shorter one
        assert beside_s <= max(1.5 * alone_s, alone_s + 0.5), (alone_s, beside_s)


def test_a_compile_over_its_time_is_refused_and_others_are_served_meanwhile(srv):
    # a JSON schema of nested objects with bounded patterns: about 2 s to compile on 2 CPU cores (40 such
    # objects took 21 s; the compile cannot be interrupted, and runs on in the grammar pool once refused)
    props = {f"p{i}": {"type": "object", "properties": {f"q{j}": {"type": "string", "pattern": f"[a-z]{{{j},{j + 9}}}"}
                                                       for j in range(30)}, "required": [f"q{j}" for j in range(30)]}
             for i in range(4)}
    schema = json.dumps({"type": "object", "properties": props, "required": list(props)})
    with srv.client() as c:
        with ThreadPoolExecutor(3) as pool:
            slow = [pool.submit(post, c, guided_json=schema) for _ in range(2)]
            time.sleep(0.2)
            t0 = time.monotonic()
            plain = post(c, max_tokens=1)  # the compiles hold the grammar pool only
            plain_s = time.monotonic() - t0
            answers = [f.result() for f in slow]
        assert plain.status_code == 200 and plain_s < 5.0, (plain.text, plain_s)
        for r in answers:
            err = assert_error_shape(r, 400)
            assert "took longer than 0.3 s" in err["message"], err
        t0 = time.monotonic()
        assert_error_shape(post(c, guided_json=schema), 400)  # refused again at once: no second compile
        assert time.monotonic() - t0 < 1.0
