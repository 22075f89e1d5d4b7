"""Keys: the inference key cannot manage experts (every managing route, 403), missing and wrong keys get
401, every key check goes through a constant-time comparison (keys that refuse any other comparison
still work), and neither a key nor an expert's numbers appear in any log record or error message."""
from __future__ import annotations

import hmac
import logging
import secrets

import pytest
import torch

from tests.support.experts import as_lists, auth, random_z
from tests.support.live import assert_error_shape, serve

pytestmark = pytest.mark.reliability

USER_KEY, ADMIN_KEY, WRONG_KEY = (f"sk-{role}-{secrets.token_hex(12)}" for role in ("infer", "admin", "wrong"))
MARK = 1234.56789  # an expert value no message has any business quoting


class OnlyConstantTime(str):
    """A key that refuses every comparison but hmac.compare_digest's (which sees its UTF-8 bytes)."""

    def _refuse(self, *_):
        raise AssertionError("an API key was compared outside hmac.compare_digest")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = startswith = endswith = _refuse
    __hash__ = str.__hash__


@pytest.fixture(scope="module")
def srv(rel_settings):
    settings = rel_settings()
    settings.api_key, settings.admin_api_key = OnlyConstantTime(USER_KEY), OnlyConstantTime(ADMIN_KEY)
    with serve(settings) as s:
        yield s


def expert_z(srv) -> dict:
    z = as_lists(random_z(srv.state.store.base, 1))
    first = next(iter(z))
    z[first][0] = MARK
    return z


def managing_requests(srv) -> dict:
    """name -> request(client, headers) of every route that manages experts."""
    z = expert_z(srv)
    return {
        "upload": lambda c, h: c.post("/v1/experts", json={"name": "x", "z": z}, headers=h),
        "delete": lambda c, h: c.delete("/v1/experts/kept", headers=h),
        "download": lambda c, h: c.get("/v1/experts/kept/content", headers=h),
        "few-shot adaptation": lambda c, h: c.post("/v1/adaptations", headers=h, json={
            "task": "t", "experts": ["kept"], "examples": [{"prompt": "a", "answer": "b"}]}),
    }


def test_inference_key_cannot_manage_experts(srv, report):
    with srv.client() as c:
        kept = c.post("/v1/experts", json={"name": "kept", "z": expert_z(srv)}, headers=auth(ADMIN_KEY))
        assert kept.status_code == 200, kept.text
        for what, send in managing_requests(srv).items():
            err = assert_error_shape(send(c, auth(USER_KEY)), 403)
            assert err["code"] == "admin_key_required" and err["type"] == "permission_error", what
            for key in (None, WRONG_KEY, "", USER_KEY + "x", USER_KEY[:-1], ADMIN_KEY.upper()):
                err = assert_error_shape(send(c, auth(key) if key else {}), 401)
                assert err["code"] == "invalid_api_key", (what, key)
                report.add("auth.refused")
        # Reading takes either key; the expert is still there, untouched.
        for key in (USER_KEY, ADMIN_KEY):
            card = c.get("/v1/experts/kept", headers=auth(key))
            assert card.status_code == 200 and card.json()["version"] == 1
        assert c.get("/v1/experts/kept/content", headers=auth(ADMIN_KEY)).status_code == 200


def test_inference_needs_the_inference_key(srv, report):
    body = {"prompt": "hi", "max_tokens": 2}
    with srv.client() as c:
        for key in (None, WRONG_KEY, USER_KEY[:-1]):
            assert_error_shape(c.post("/v1/completions", json=body, headers=auth(key) if key else {}), 401)
            report.add("auth.refused")
        assert c.post("/v1/completions", json=body, headers=auth(USER_KEY)).status_code == 200
        r = c.post("/v1/completions", json=body, headers={"Authorization": f"Basic {USER_KEY}"})
        assert_error_shape(r, 401)


def test_every_key_check_is_constant_time(srv, monkeypatch):
    """The keys refuse `==` and friends (see OnlyConstantTime), so every answer above came from
    compare_digest; here, that each checked request really calls it."""
    calls = []
    real = hmac.compare_digest

    def counted(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    with srv.client() as c:
        for key in (USER_KEY, WRONG_KEY, ADMIN_KEY):
            before = len(calls)
            c.get("/v1/models", headers=auth(key))
            c.get("/v1/experts", headers=auth(key))
            c.delete("/v1/experts/absent", headers=auth(key))
            assert len(calls) - before >= 3
    assert all(a is bytes and b is bytes for a, b in calls)


def test_no_key_or_expert_data_in_logs_or_errors(srv, caplog, report):
    caplog.set_level(logging.DEBUG)
    secrets_seen = []
    z = expert_z(srv)
    first = next(iter(z))
    bad_shape = {**z, first: z[first][:-1]}
    nan = {**z, first: [MARK, float("nan")] + z[first][2:]}
    with srv.client() as c:
        attempts = [
            c.post("/v1/completions", json={"prompt": "x"}, headers=auth(WRONG_KEY)),
            c.post("/v1/experts", json={"name": "x", "z": z}, headers=auth(USER_KEY)),
            c.post("/v1/experts", json={"name": "x", "z": z}, headers=auth(WRONG_KEY)),
            c.post("/v1/experts", json={"name": "x", "z": bad_shape}, headers=auth(ADMIN_KEY)),
            c.post("/v1/experts", headers={**auth(ADMIN_KEY), "content-type": "application/json"},
                   content=('{"name": "x", "z": {"%s": %s}}' % (first, nan[first])).replace("nan", "NaN")),
            c.post("/v1/experts", json={"name": "x", "z": z, "base_fingerprint": "0" * 64}, headers=auth(ADMIN_KEY)),
            c.post("/v1/experts", json={"name": "../x", "z": z}, headers=auth(ADMIN_KEY)),
            c.post("/v1/completions", json={"prompt": "x", "model": "x", "adaptation": {"experts": {"kept": MARK}}},
                   headers=auth(USER_KEY)),
            c.get("/v1/experts/nope/content", headers=auth(ADMIN_KEY)),
        ]
        ok = c.post("/v1/experts", json={"name": "logged", "z": z}, headers=auth(ADMIN_KEY))
        assert ok.status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x", "model": "logged", "max_tokens": 2},
                      headers=auth(USER_KEY)).status_code == 200
        metrics = c.get("/metrics").text
    for r in attempts:
        assert 400 <= r.status_code < 500, r.text
        report.add("auth.error_messages_checked")
    needles = (USER_KEY, ADMIN_KEY, WRONG_KEY, str(MARK), f"{MARK:.3f}", USER_KEY[3:15], ADMIN_KEY[3:15])
    texts = [r.text for r in attempts] + [metrics] + [rec.getMessage() + (rec.exc_text or "") for rec in caplog.records]
    for text in texts:
        secrets_seen += [n for n in needles if n in text]
    assert caplog.records, "nothing was logged: the check would be empty"
    assert not secrets_seen, secrets_seen
    stored = srv.state.store.get("logged").payload.z[first]
    assert torch.isclose(stored[0], torch.tensor(MARK))  # the mark was real data, served as such
