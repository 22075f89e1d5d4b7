"""The store without a server: versions, restarts, recovery of interrupted writes, names, mixtures,
and concurrent writers of one name."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os

import pytest
import torch

from adapters.adaptation import Adaptation, SVFMixture
from experts.store.errors import ExpertError
from experts.store.expert_store import ExpertStore
from experts.store.lock import CONTROL_FILES
from experts.store.registry import ExpertRegistry
from experts.store.validation import ExpertDraft
from tests.support.experts import random_z


def svf(name: str, z, **kw) -> ExpertDraft:
    return ExpertDraft(name, "svf", dict(z), **kw)


def files(root, name):
    return sorted(p.name for p in (root / name).iterdir())


def test_put_replace_and_reload(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.load()
    v1 = store.put(svf("math", random_z(base_mlp, 0), category="math"))
    held = store.registry.get("math").expert  # what a request in flight holds
    v2 = store.put(svf("math", random_z(base_mlp, 1), category="math"))
    assert (v1.record.version, v2.record.version) == (1, 2)
    assert files(tmp_path, "math") == ["v000002.json", "v000002.safetensors"]
    # The old version's tensors are untouched: replacing the registry entry never mutates them.
    assert all(torch.equal(held.z[n], random_z(base_mlp, 0)[n]) for n in held.z)
    assert store.registry.get("math").meta["version"] == 2
    reopened = ExpertStore(tmp_path, base=base_mlp)
    [got] = reopened.load()
    assert got.ready and got.record == v2.record
    z = reopened.registry.get("math").expert.z
    assert list(z) == [t.name for t in base_mlp.targets]  # model order
    assert all(torch.equal(z[n], random_z(base_mlp, 1)[n]) for n in z)
    assert reopened.put(svf("math", random_z(base_mlp, 2))).record.version == 3


def test_delete_is_immediate_and_durable(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.put(svf("code", random_z(base_mlp, 0)))
    store.delete("code")
    assert "code" not in store.registry and store.get("code") is None
    assert not (tmp_path / "code").exists()
    assert ExpertStore(tmp_path, base=base_mlp).load() == []
    with pytest.raises(ExpertError) as e:
        store.delete("code")
    assert e.value.status == 404


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "a..b", "é", "na me", "-x"])
def test_bad_names_are_refused(tmp_path, base_mlp, name):
    store = ExpertStore(tmp_path, base=base_mlp)
    with pytest.raises(ExpertError) as e:
        store.put(svf(name, random_z(base_mlp, 0)))
    assert e.value.code == "invalid_name"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_base_model_name_is_reserved(tmp_path, base_mlp):
    with pytest.raises(ExpertError) as e:
        ExpertStore(tmp_path, base=base_mlp).put(svf("tiny", random_z(base_mlp, 0)))
    assert e.value.code == "invalid_name"


def test_recovery_removes_leftovers_and_falls_back(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.put(svf("math", random_z(base_mlp, 0)))
    store.put(svf("code", random_z(base_mlp, 1)))
    d = tmp_path / "math"
    # Leftovers of interrupted writes: an uncommitted v2 tensor file, temp files (in a name's folder and of
    # the store's change counter), staged bytes, trash.
    (d / "v000002.safetensors").write_bytes(b"partial")
    (d / ".v000002.json.abc.tmp").write_text("{")
    (tmp_path / ".incoming").mkdir(exist_ok=True)
    (tmp_path / ".incoming" / ".math.x.tmp").write_bytes(b"x")
    (tmp_path / ".trash-old-1234").mkdir()
    (tmp_path / ".generation.x1y2.tmp").write_bytes(b"7")  # the change counter's update, killed mid-way
    (tmp_path / "half").mkdir()  # a new name whose first version never committed
    (tmp_path / "half" / "v000001.safetensors").write_bytes(b"x")
    # code's newest record is corrupt (bit rot, a hand edit): the older complete version is used instead,
    # and the damaged one is moved aside, not deleted.
    c = tmp_path / "code"
    (c / "v000002.safetensors").write_bytes((c / "v000001.safetensors").read_bytes())
    (c / "v000002.json").write_text('{"format": "t2serve-expert/1", "name": "code"')
    reopened = ExpertStore(tmp_path, base=base_mlp)
    got = {s.name: s for s in reopened.load()}
    assert set(got) == {"math", "code"} and got["code"].record.version == 1
    assert files(tmp_path, "math") == ["v000001.json", "v000001.safetensors"]
    assert files(tmp_path, "code") == ["v000001.json", "v000001.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in CONTROL_FILES) == [".quarantine", "code", "math"]
    [q] = reopened.quarantined()
    assert q["name"] == "code" and list(q["versions"]) == ["2"] and "not JSON" in q["versions"]["2"]
    assert reopened.put(svf("code", random_z(base_mlp, 3))).record.version == 3  # numbers are never reused


def test_a_flipped_bit_quarantines_the_expert_and_keeps_its_files(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.put(svf("math", random_z(base_mlp, 0)))
    store.put(svf("code", random_z(base_mlp, 1)))
    f = tmp_path / "math" / "v000001.safetensors"
    original = f.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x04  # one bit of one stored value
    f.write_bytes(bytes(data))
    record = (tmp_path / "math" / "v000001.json").read_bytes()
    reopened = ExpertStore(tmp_path, base=base_mlp)
    assert [s.name for s in reopened.load()] == ["code"] and "math" not in reopened.registry
    [q] = reopened.quarantined()
    assert q["name"] == "math" and "sha256" in q["versions"]["1"]
    kept = tmp_path / q["path"]
    assert (kept / "v000001.safetensors").read_bytes() == bytes(data)  # the files as they were, for inspection
    assert (kept / "v000001.json").read_bytes() == record
    assert not (tmp_path / "math").exists()
    # Later starts keep it where it is and still report it; the name is free for a new upload.
    again = ExpertStore(tmp_path, base=base_mlp)
    assert [s.name for s in again.load()] == ["code"] and again.quarantined() == [q]
    assert again.put(svf("math", random_z(base_mlp, 2))).record.version == 1


def test_experts_for_other_weights_or_targets_are_kept_but_not_served(tmp_path, base_mlp, base_all):
    ExpertStore(tmp_path, base=base_all).put(svf("attn", {t.name: torch.zeros(t.rank) for t in base_all.targets
                                                          if "self_attn" in t.name}))
    with pytest.raises(ExpertError) as e:
        ExpertStore(tmp_path, base=base_mlp).put(svf("other", random_z(base_mlp, 0), base_fingerprint="0" * 64))
    assert e.value.code == "base_model_mismatch"
    # A stored expert of another model (as after swapping T2_MODEL): listed as incompatible, not served.
    offline = ExpertStore(tmp_path)  # no model at hand: nothing to check against
    offline.put(svf("foreign", random_z(base_mlp, 0), base_fingerprint="f" * 64))
    mlp = ExpertStore(tmp_path, base=base_mlp)
    got = {s.name: s for s in mlp.load()}
    assert got["attn"].status == "incompatible" and "not adapted matrices" in got["attn"].reason
    assert got["foreign"].status == "incompatible" and "another base model" in got["foreign"].reason
    assert "attn" not in mlp.registry and "foreign" not in mlp.registry
    assert ExpertStore(tmp_path, base=base_all).load()[0].ready  # served again where it fits


def test_mixture_is_the_request_time_mixture(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    a, b = (store.put(svf(n, random_z(base_mlp, s))).payload for s, n in enumerate(["a", "b"]))
    mix = store.put(ExpertDraft("ab", "mixture", {"alpha": torch.tensor([0.3, 0.7])}, experts=("a", "b"),
                                category="math"))
    served = Adaptation.expert(store.registry.get("ab").expert)
    direct = Adaptation.mixture({a: 0.3, b: 0.7})
    sigma = {t.name: torch.rand(t.rank) + 0.1 for t in base_mlp.targets}
    for n, s in direct.svf.scales(sigma).items():
        torch.testing.assert_close(served.svf.scales(sigma)[n], s)
    assert mix.record.spec["experts"] == ["a", "b"] and mix.record.parametrization == "sakana"
    # Per expert x matrix weights.
    names = [t.name for t in base_mlp.targets]
    alpha = torch.rand(2, len(names))
    store.put(ExpertDraft("ab2", "mixture", {"alpha": alpha}, experts=("a", "b"), alpha_targets=tuple(names)))
    ref = SVFMixture((a, b), alpha, tuple(names))
    for n in names:
        torch.testing.assert_close(store.registry.get("ab2").expert.z[n], ref.z_for(n))


def test_mixture_follows_its_parts(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.put(svf("a", random_z(base_mlp, 0)))
    store.put(svf("b", random_z(base_mlp, 1)))
    store.put(ExpertDraft("ab", "mixture", {"alpha": torch.tensor([1.0, 0.0])}, experts=("a", "b")))
    new_a = random_z(base_mlp, 5)
    store.put(svf("a", new_a))  # replacing a part re-mixes the mixture at once
    assert all(torch.allclose(store.registry.get("ab").expert.z[n], new_a[n]) for n in new_a)
    with pytest.raises(ExpertError) as e:  # a part may not change shape under its mixture
        store.put(svf("a", {n: v for n, v in list(new_a.items())[:2]}))
    assert e.value.status == 409 and e.value.code == "expert_in_use"
    with pytest.raises(ExpertError) as e:
        store.delete("a")
    assert e.value.status == 409
    with pytest.raises(ExpertError) as e:
        store.put(ExpertDraft("bad", "mixture", {"alpha": torch.tensor([1.0])}, experts=("nope",)))
    assert e.value.code == "expert_not_found"
    store.delete("ab")
    store.delete("a")
    reopened = ExpertStore(tmp_path, base=base_mlp)
    assert [s.name for s in reopened.load()] == ["b"]


def test_concurrent_writers_of_one_name_leave_one_complete_version(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    zs = [random_z(base_mlp, s) for s in range(12)]
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda z: store.put(svf("race", z)), zs))
    assert sorted(r.record.version for r in results) == list(range(1, 13))
    assert files(tmp_path, "race") == ["v000012.json", "v000012.safetensors"]
    last = max(results, key=lambda r: r.record.version)
    record = json.loads((tmp_path / "race" / "v000012.json").read_text())
    assert record["sha256"] == last.record.sha256
    served = store.registry.get("race").expert
    assert served is last.payload
    assert not os.listdir(tmp_path / ".incoming")


def test_sapt_bundle_round_trip(tmp_path, base_all):
    from adapters.sapt import SAPTBundle
    from experts.store.sapt_tensors import bundle_tensors

    qv = {t.name: (t.out_features, t.in_features) for t in base_all.targets if t.name.endswith(("q_proj", "v_proj"))}
    torch.manual_seed(0)
    bundle = SAPTBundle(qv, d_model=base_all.d_model, num_tasks=3, rank=4, alpha=32)
    with torch.no_grad():
        for p in bundle.parameters():
            p.add_(torch.randn_like(p))
    store = ExpertStore(tmp_path, base=base_all)
    stored = store.put(ExpertDraft("skills", "sapt", bundle_tensors(bundle), lora_alpha=32.0))
    assert "skills" not in store.registry  # bundles are served by pass 1, not by name
    assert store.bundle("skills") is stored.payload and stored.record.spec["num_tasks"] == 3
    reloaded = ExpertStore(tmp_path, base=base_all)
    reloaded.load()
    got = reloaded.bundle("skills")
    assert not any(p.requires_grad for p in got.parameters())
    assert got.bundle_id == stored.payload.bundle_id  # content-derived: stable across restarts
    x, mask = torch.randn(2, 5, base_all.d_model), torch.ones(2, 5)
    torch.testing.assert_close(got.attention(x, mask), bundle.attention(x, mask))
    for n, (A, B) in bundle.stacked_lora().items():
        torch.testing.assert_close(got.stacked_lora()[n][0], A.detach())
        torch.testing.assert_close(got.stacked_lora()[n][1], B.detach())
    with pytest.raises(ExpertError) as e:  # q/v blocks do not fit a server adapting only the MLP
        ExpertStore(tmp_path / "other", base=_mlp_of(base_all)).put(
            ExpertDraft("skills", "sapt", bundle_tensors(bundle), lora_alpha=32.0))
    assert e.value.code == "unknown_target"


def _mlp_of(base):
    from dataclasses import replace

    return replace(base, targets=tuple(t for t in base.targets if ".mlp." in t.name))


def test_registry_is_only_written_through_the_store(tmp_path, base_mlp):
    registry = ExpertRegistry()
    store = ExpertStore(tmp_path, registry, base=base_mlp)
    store.put(svf("math", random_z(base_mlp, 0), category="math"))
    entry = registry.get("math")
    assert entry.meta["category"] == "math" and entry.meta["kind"] == "svf" and entry.meta["version"] == 1
