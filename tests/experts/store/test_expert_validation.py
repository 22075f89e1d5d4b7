"""Every way an upload can be wrong gets a 4xx in the OpenAI error shape whose code and message name
the problem, and leaves nothing behind (no registry entry, no file)."""
from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save

from experts.store.lock import CONTROL_FILES
from tests.support.experts import as_lists, post_files, post_json, random_z
from tests.support.live import assert_error_shape, serve

MAX_EXPERT = 20_000


@pytest.fixture(scope="module")
def srv(expert_settings, tmp_path_factory):
    with serve(expert_settings(expert_dir=tmp_path_factory.mktemp("store"), max_expert_bytes=MAX_EXPERT,
                                       max_body_bytes=50_000)) as s:
        yield s


@pytest.fixture(scope="module")
def z(base_mlp):
    return random_z(base_mlp, 0)


def st(tensors) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def zip_bomb(unpacked: int = 8 << 20) -> bytes:
    """A torch-style archive whose one deflated member unpacks to ``unpacked`` zero bytes (a few KiB sent)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * unpacked)
    return buf.getvalue()


def _cases(z):
    names = list(z)
    q_proj = "model.layers.0.self_attn.q_proj"
    first = names[0]
    return {
        "shape (json)": (lambda c: post_json(c, "e", {**z, first: z[first][:-1]}), 400, "shape_mismatch", "z", "k = "),
        "shape (2-d)": (lambda c: post_files(c, {"name": "e"}, [("file", st({**z, first: z[first].reshape(8, -1)}))]),
                        400, "shape_mismatch", "file", "must be a vector"),
        "nan": (lambda c: post_files(c, {"name": "e"}, [("file", st({**z, first: z[first] * float("nan")}))]),
                400, "non_finite", "file", "NaN or infinite"),
        "inf": (lambda c: post_files(c, {"name": "e"}, [("file", st({**z, first: z[first] / 0}))]),
                400, "non_finite", "file", first),
        "archive unpacks too large": (lambda c: post_files(c, {"name": "e", "format": "policy_params"},
                                                           [("file", zip_bomb())]),
                                      413, "expert_too_large", "file", "unpacks to"),
        "extreme sakana z": (lambda c: post_json(c, "e", {**z, first: z[first] * 0 - 1e30}), 400, "out_of_range",
                             "z", "±10000"),
        "extreme direct z": (lambda c: post_json(c, "e", {**z, first: z[first] * 0 + 100}, parametrization="direct"),
                             400, "out_of_range", "z", "direct"),
        "dtype": (lambda c: post_files(c, {"name": "e"}, [("file", st({**z, first: z[first].to(torch.int32)}))]),
                  400, "invalid_dtype", "file", "int32"),
        "missing target": (lambda c: post_json(c, "e", {n: z[n] for n in names[1:]}, targets=names),
                           400, "missing_target", "z", first),
        "unknown target": (lambda c: post_json(c, "e", {**z, q_proj: torch.zeros(64)}), 400, "unknown_target", "z",
                           q_proj),
        "undeclared target": (lambda c: post_json(c, "e", z, targets=names[:2]), 400, "unknown_target", "z",
                              names[2]),
        "no tensors": (lambda c: c.post("/v1/experts", json={"name": "e"}), 400, "missing_file", "file", "no tensors"),
        "fingerprint": (lambda c: post_json(c, "e", z, base_fingerprint="ab" * 32), 400, "base_model_mismatch",
                        "base_fingerprint", "another base model"),
        "over the limit": (lambda c: post_files(c, {"name": "e"}, [("file", b"\0" * (MAX_EXPERT + 1000))]),
                           413, "expert_too_large", "file", "T2_MAX_EXPERT_BYTES"),
        "body over the limit": (lambda c: post_files(c, {"name": "e"}, [("file", b"\0" * (MAX_EXPERT + 80_000))]),
                                413, "request_too_large", None, "too large"),
        "metadata not json": (lambda c: c.post("/v1/experts", data={"metadata": "{name"}, files={"file": b"x"}),
                              400, "invalid_metadata", "metadata", "not valid JSON"),
        "metadata missing": (lambda c: c.post("/v1/experts", files={"file": ("f", st(z))}),
                             400, "missing_metadata", "metadata", "metadata"),
        "metadata unknown field": (lambda c: post_files(c, {"name": "e", "colour": "red"}, [("file", st(z))]),
                                   400, "invalid_value", "metadata.colour", "colour"),
        "metadata bad kind": (lambda c: post_files(c, {"name": "e", "kind": "lora"}, [("file", st(z))]),
                              400, "invalid_value", "metadata.kind", "kind"),
        "metadata bad category": (lambda c: post_files(c, {"name": "e", "category": "Math!"}, [("file", st(z))]),
                                  400, "invalid_metadata", "metadata.category", "category"),
        "unexpected part": (lambda c: post_files(c, {"name": "e"}, [("weights", st(z))]), 400, "invalid_value",
                            "weights", "Unexpected multipart field"),
        "bad json body": (lambda c: c.post("/v1/experts", content=b"{", headers={"content-type": "application/json"}),
                          400, "invalid_json", None, "Malformed JSON"),
        "z not numbers": (lambda c: c.post("/v1/experts", json={"name": "e", "z": {first: ["a"]}}), 400,
                          "invalid_value", f"z.{first}.0", "number"),
        "content type": (lambda c: c.post("/v1/experts", content=b"x", headers={"content-type": "text/plain"}),
                         415, "unsupported_media_type", None, "multipart"),
        "pickle": (lambda c: post_files(c, {"name": "e"}, [("file", pickle.dumps({"z": [1.0]}, protocol=4))]),
                   400, "pickle_not_allowed", "file", "pickle"),
        "pickle protocol 0": (lambda c: post_files(c, {"name": "e"}, [("file", pickle.dumps([1.0, 2.0], protocol=0))]),
                              400, "pickle_not_allowed", "file", "pickle"),
        "torch.save": (lambda c: post_files(c, {"name": "e"}, [("file", _torch_save(z))]), 400, "pickle_not_allowed",
                       "file", "torch.save"),
        "header lies": (lambda c: post_files(c, {"name": "e"}, [("file", _lying_header(z))]), 400,
                        "invalid_safetensors", "file", "not a valid safetensors"),
        "garbage": (lambda c: post_files(c, {"name": "e"}, [("file", b"hello, world" * 10)]), 400,
                    "invalid_safetensors", "file", "not a safetensors"),
        "traversal name": (lambda c: post_json(c, "../../etc/x", z), 400, "invalid_name", "name", "Invalid expert name"),
        "long name": (lambda c: post_json(c, "n" * 64 + "x", z), 400, "invalid_value", "name", "64"),
        "model name": (lambda c: post_json(c, "tiny", z), 400, "invalid_name", "name", "served model"),
        "mixture of nobody": (lambda c: c.post("/v1/experts", json={"name": "m", "kind": "mixture",
                                                                    "experts": {"ghost": 1.0}}),
                              400, "expert_not_found", "experts", "ghost"),
        "mixture weights": (lambda c: c.post("/v1/experts", json={"name": "m", "kind": "mixture",
                                                                  "experts": ["a", "b"], "weights": [1.0]}),
                            400, "shape_mismatch", "weights", "one weight per expert"),
        "sapt on mlp": (lambda c: post_files(c, {"name": "e", "kind": "sapt", "lora_alpha": 8}, [("file", _sapt())]),
                        400, "unknown_target", "file", "not an adapted matrix"),
        "sapt without alpha": (lambda c: post_files(c, {"name": "e", "kind": "sapt"}, [("file", _sapt())]),
                               400, "invalid_metadata", "metadata.lora_alpha", "lora_alpha"),
    }


def _torch_save(z) -> bytes:
    buf = io.BytesIO()
    torch.save(z, buf)
    return buf.getvalue()


def _lying_header(z) -> bytes:
    data = bytearray(st(z))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4  # overlaps the next tensor / runs past the end
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n:])


def _sapt() -> bytes:
    d, r = 64, 2
    t = {"query.down": torch.randn(8, d), "query.up": torch.randn(d, 8), "query.norm.weight": torch.ones(d),
         "query.norm.bias": torch.zeros(d), "task.0.key": torch.randn(d),
         "task.0.lora_A.model.layers.0.self_attn.q_proj": torch.randn(r, d),
         "task.0.lora_B.model.layers.0.self_attn.q_proj": torch.randn(d, r)}
    return st(t)


CASES = list(_cases({f"m{i}": torch.zeros(1) for i in range(3)}))


@pytest.mark.parametrize("case", CASES)
def test_refused_with_a_named_problem(srv, z, case):
    send, status, code, param, words = _cases(z)[case]
    with srv.client() as c:
        err = assert_error_shape(send(c), status)
        assert err["code"] == code, err
        assert err["param"] == param, err
        assert words in err["message"], err
        assert c.get("/v1/experts").json()["data"] == []
    assert len(srv.state.registry) == 0
    root = srv.state.settings.resolved_expert_dir()
    assert [p.name for p in root.iterdir() if p.name not in (".incoming", *CONTROL_FILES)] == []
    assert list((root / ".incoming").iterdir()) == [] if (root / ".incoming").exists() else True


def test_valid_upload_after_all_that(srv, z):
    with srv.client() as c:
        r = post_json(c, "fine", z, category="math")
        assert r.status_code == 200, r.text
        assert c.delete("/v1/experts/fine").status_code == 200
    assert as_lists(z)  # the fixture tensors were not modified by any upload


def test_experts_check_finds_what_todays_rules_refuse(tmp_path, tiny_llama_dir, base_mlp, monkeypatch, capsys):
    """A store written before the value bounds existed: ``t2serve experts check`` names the expert that
    would now be refused (and exits 1); the others pass."""
    from experts.store import validation
    from experts.store.expert_store import ExpertStore
    from experts.store.validation import ExpertDraft
    from server.cli import main

    monkeypatch.setitem(validation.MAX_Z, "sakana", 1e40)  # the store of an older release
    store = ExpertStore(tmp_path / "store", base=base_mlp)
    store.load()
    store.put(ExpertDraft("fine", "svf", random_z(base_mlp, 1)))
    store.put(ExpertDraft("extreme", "svf", {n: v * 0 - 1e30 for n, v in random_z(base_mlp, 2).items()}))
    monkeypatch.undo()
    args = ["experts", "check", "--model", str(tiny_llama_dir), "--cache-dir", str(tmp_path / "cache"),
            "--expert-dir", str(tmp_path / "store")]
    assert main(args) == 1
    out = capsys.readouterr()
    lines = {line.split("\t")[0]: line.split("\t") for line in out.out.splitlines()}
    assert lines["fine"][2] == "ready" and lines["extreme"][2] == "incompatible" and "±10000" in lines["extreme"][3]
    assert "1 of 2 expert(s) pass; not served: extreme" in out.err
