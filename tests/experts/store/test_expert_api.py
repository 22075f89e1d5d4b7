"""The expert API on a live server: an upload is served by the very next request (checked against
merged weights), requests in flight keep their version, deletions apply at once, keys are enforced,
concurrent uploads of one name serialise, and a malicious pickle never runs."""
from __future__ import annotations

import builtins
import concurrent.futures as cf
import hashlib
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save
from transformers import AutoTokenizer

from tests.support.experts import ADMIN, USER, auth, post_files, post_json, random_z
from tests.support.live import assert_error_shape, serve
from tests.support.reference import reference_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def srv(expert_settings, tmp_path_factory):
    settings = expert_settings(expert_dir=tmp_path_factory.mktemp("store"), api_key=USER, admin_api_key=ADMIN)
    with serve(settings) as s:
        yield s


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def greedy(model, tok, prompt: str, n: int) -> str:
    """HF generate with the merged reference weights; stops at EOS as the server does."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(c, model: str, n: int = 12, **extra) -> dict:
    r = c.post("/v1/completions", headers=auth(USER),
               json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, **extra})
    return r


def test_upload_is_served_by_the_next_request(srv, base_mlp, tok, tiny_llama_dir, tiny_model):
    z_json, z_file = random_z(base_mlp, 10), random_z(base_mlp, 11)
    with srv.client() as c:
        assert post_json(c, "fresh", z_json, category="math").status_code == 200
        r = complete(c, "fresh")  # the very next request
        assert r.status_code == 200 and r.json()["model"] == "fresh"
        up = post_files(c, {"name": "fromfile", "category": "code"}, [("file", save(z_file))])
        assert up.status_code == 200, up.text
        mixed = complete(c, "tiny", adaptation={"experts": {"fresh": 0.5, "fromfile": 0.5}})
        assert mixed.status_code == 200, mixed.text
        models = {m["id"]: m for m in c.get("/v1/models", headers=auth(USER)).json()["data"]}
    assert models["fresh"]["parent"] == "tiny" and models["fromfile"]["parent"] == "tiny"
    from adapters.adaptation import SVFExpert

    a, b = SVFExpert("a", z_json), SVFExpert("b", z_file)
    assert r.json()["choices"][0]["text"] == greedy(reference_model(tiny_llama_dir, [(a, 1.0)]), tok, PROMPT, 12)
    want = greedy(reference_model(tiny_llama_dir, [(a, 0.5), (b, 0.5)]), tok, PROMPT, 12)
    assert mixed.json()["choices"][0]["text"] == want
    assert r.json()["choices"][0]["text"] != greedy(tiny_model, tok, PROMPT, 12)  # the expert matters


def test_request_in_flight_keeps_its_version(srv, base_mlp, tok, tiny_llama_dir):
    from adapters.adaptation import SVFExpert

    v1, v2 = random_z(base_mlp, 20), random_z(base_mlp, 21)
    # Long enough to overlap the replacement by many decode steps; short enough that float rounding
    # (factored vs merged weights vs the float64 reference) cannot flip a greedy choice of this model.
    n = 80
    with srv.client() as c:
        assert post_json(c, "moving", v1).status_code == 200
        chunks, after = [], 0
        body = {"model": "moving", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/completions", json=body, headers=auth(USER)) as stream:
            replaced = False
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
                if not replaced:  # replace the expert while this request is being decoded
                    assert post_json(c, "moving", v2).json()["version"] == 2
                    replaced = True
                else:
                    after += 1
        later = complete(c, "moving", n=12).json()["choices"][0]["text"]
    assert after > 10, "the stream ended before the replacement: the test proves nothing"
    want_v1 = greedy(reference_model(tiny_llama_dir, [(SVFExpert("v1", v1), 1.0)]), tok, PROMPT, n)
    want_v2 = greedy(reference_model(tiny_llama_dir, [(SVFExpert("v2", v2), 1.0)]), tok, PROMPT, n)
    assert "".join(chunks) == want_v1 and want_v1 != want_v2
    assert want_v2.startswith(later)


def test_delete_applies_at_once(srv, base_mlp):
    with srv.client() as c:
        assert post_json(c, "brief", random_z(base_mlp, 30)).status_code == 200
        assert complete(c, "brief").status_code == 200
        r = c.delete("/v1/experts/brief", headers=auth(ADMIN))
        assert r.json() == {"id": "brief", "object": "expert.deleted", "deleted": True}
        assert_error_shape(complete(c, "brief"), 404)
        err = assert_error_shape(complete(c, "tiny", adaptation={"experts": ["brief"]}), 400)
        assert err["code"] == "expert_not_found"
        assert "brief" not in [m["id"] for m in c.get("/v1/models", headers=auth(USER)).json()["data"]]
        assert_error_shape(c.get("/v1/experts/brief", headers=auth(USER)), 404)
        assert_error_shape(c.delete("/v1/experts/brief", headers=auth(ADMIN)), 404)


def test_cards_and_content(srv, base_mlp):
    z = random_z(base_mlp, 40)
    with srv.client() as c:
        card = post_json(c, "described", z, category="reasoning", description="for tests").json()
        assert {k: card[k] for k in ("id", "object", "kind", "category", "description", "version", "parent", "status")} \
            == {"id": "described", "object": "expert", "kind": "svf", "category": "reasoning",
                "description": "for tests", "version": 1, "parent": "tiny", "status": "ready"}
        assert card["targets"] == [t.name for t in base_mlp.targets]
        assert card["base_fingerprint"] == base_mlp.fingerprint
        listed = {e["id"]: e for e in c.get("/v1/experts", headers=auth(USER)).json()["data"]}
        assert listed["described"] == card
        content = c.get("/v1/experts/described/content", headers=auth(ADMIN))
        assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == card["sha256"]
        mix = c.post("/v1/experts", headers=auth(ADMIN), json={"name": "blend", "kind": "mixture",
                                                                "experts": ["described"], "weights": [0.5]})
        assert mix.status_code == 200 and mix.json()["spec"]["experts"] == ["described"]
        assert complete(c, "blend").status_code == 200
        assert_error_shape(c.delete("/v1/experts/described", headers=auth(ADMIN)), 409)


def test_admin_and_inference_keys(srv, base_mlp):
    z = random_z(base_mlp, 50)
    with srv.client() as c:
        assert assert_error_shape(post_json(c, "k", z, key=USER), 403)["code"] == "admin_key_required"
        assert assert_error_shape(post_json(c, "k", z, key=None), 401)["code"] == "invalid_api_key"
        assert assert_error_shape(post_json(c, "k", z, key="guess"), 401)["code"] == "invalid_api_key"
        assert post_json(c, "k", z, key=ADMIN).status_code == 200
        assert_error_shape(c.delete("/v1/experts/k", headers=auth(USER)), 403)
        assert_error_shape(c.get("/v1/experts/k/content", headers=auth(USER)), 403)
        assert c.get("/v1/experts", headers=auth(USER)).status_code == 200
        assert c.get("/v1/experts/k", headers=auth(ADMIN)).status_code == 200
        assert_error_shape(c.get("/v1/experts"), 401)
        assert complete(c, "k").status_code == 200  # the inference key uses what it may not manage
        assert c.delete("/v1/experts/k", headers=auth(ADMIN)).status_code == 200


def test_concurrent_uploads_of_one_name(srv, base_mlp):
    zs = [random_z(base_mlp, 60 + i) for i in range(8)]
    with srv.client() as c, cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda z: post_json(c, "race", z).json(), zs))
        card = c.get("/v1/experts/race", headers=auth(USER)).json()
    assert sorted(r["version"] for r in results) == list(range(1, 9))
    winner = max(results, key=lambda r: r["version"])
    assert card["version"] == 8 and card["sha256"] == winner["sha256"]
    folder = srv.state.settings.resolved_expert_dir() / "race"
    assert sorted(p.name for p in folder.iterdir()) == ["v000008.json", "v000008.safetensors"]
    served = srv.state.registry.get("race").expert
    z_won = zs[results.index(winner)]
    assert all(torch.equal(served.z[n], z_won[n]) for n in z_won)


class Payload:
    """Unpickling this runs code: it writes the file named in its argument."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",)


def test_malicious_pickle_is_refused_and_never_runs(srv, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(str(control))))  # the payload is live: unpickling it runs it
    assert control.read_text() == "pwned"
    marker = tmp_path / "marker"
    raw = pickle.dumps({"learnable_params_module_list.0": Payload(str(marker))}, protocol=2)
    zipped = io.BytesIO()
    torch.save({"model.layers.0.mlp.gate_proj.weight": Payload(str(marker))}, zipped)
    attempts = [
        ({"name": "evil"}, [("file", raw)], "pickle_not_allowed"),
        ({"name": "evil"}, [("file", zipped.getvalue())], "pickle_not_allowed"),
        ({"name": "evil", "format": "policy_params"}, [("file", raw)], "unsafe_or_invalid_checkpoint"),
        ({"name": "evil", "format": "learnable_params"}, [("file", zipped.getvalue())], "unsafe_or_invalid_checkpoint"),
        ({"name": "evil", "format": "sapt_reference"}, [("lora_weights_A", raw), ("lora_weights_B", raw),
                                                        ("trans_input", raw), ("prompts_keys_till_now", raw)],
         "unsafe_or_invalid_checkpoint"),
    ]
    with srv.client() as c:
        for meta, files, code in attempts:
            err = assert_error_shape(post_files(c, meta, files), 400)
            assert err["code"] == code, err
            assert_error_shape(c.get("/v1/experts/evil", headers=auth(USER)), 404)
    assert not marker.exists()


def test_a_damaged_expert_is_quarantined_and_listed_at_the_next_start(expert_settings, base_mlp, tmp_path):
    """One flipped bit in a stored tensor file: the restarted server serves the expert no more, keeps its
    files in the store's quarantine and lists it there."""
    settings = expert_settings(expert_dir=tmp_path / "store", api_key=USER, admin_api_key=ADMIN)
    with serve(settings) as s, s.client() as c:
        assert post_json(c, "fragile", random_z(base_mlp, 50)).status_code == 200
    f = tmp_path / "store" / "fragile" / "v000001.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x04
    f.write_bytes(bytes(data))
    with serve(settings) as s, s.client() as c:
        listed = c.get("/v1/experts", headers=auth(USER)).json()
        assert "fragile" not in {e["id"] for e in listed["data"]}
        [q] = listed["quarantined"]
        assert q["name"] == "fragile" and "sha256" in q["versions"]["1"] and q["path"].startswith(".quarantine/")
        assert (tmp_path / "store" / q["path"] / "v000001.safetensors").read_bytes() == bytes(data)
        assert_error_shape(complete(c, "fragile"), 404)
