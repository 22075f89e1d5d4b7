"""The cache folder: listing its entries, pruning them (all, by age, least recently used to a size), the
server's size cap, and the loaders marking what they use."""
from __future__ import annotations

import os
import time

import torch
from safetensors.torch import save_file

from adapters.svd_cache import load_or_compute_matrices
from adapters.targets import Target
from engine.cache import entries, prune
from server.cli import main

DAY = 86400


def _make(root, now):
    """A cache with one entry of each kind (ages in days) and an expert store."""
    def put(path, size, age_days):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_bytes(b"x" * size)
        else:
            path.mkdir()
            (path / "data.bin").write_bytes(b"x" * size)
        os.utime(path, (now - age_days * DAY, now - age_days * DAY))
        return path

    return {
        "model": put(root / "models" / "m-1", 5000, 10),
        "svd_old": put(root / "svd" / "old.safetensors", 3000, 20),
        "svd_new": put(root / "svd" / "new.safetensors", 3000, 1),
        "lock": put(root / "svd" / ".new.lock", 10, 1),
        "dead": put(root / "vllm" / "run-999999999-a", 1000, 30),
        "live": put(root / "vllm" / f"run-{os.getpid()}-b", 1000, 29),
        "training": put(root / "training" / "job1", 2000, 5),
        "store": put(root / "experts" / "store.bin", 100, 40).parent,
    }


def test_entries_are_listed_least_recently_used_first_with_the_store_last(tmp_path):
    p = _make(tmp_path, time.time())
    listed = entries(tmp_path)
    assert [e.path for e in listed] == [p["dead"], p["live"], p["svd_old"], p["model"], p["training"], p["svd_new"],
                                        p["store"]]
    assert [e.kind for e in listed][-1] == "experts" and not listed[-1].prunable
    assert listed[1].about == "live engine" and listed[0].about == "left by a stopped engine"
    assert {e.path: e.size for e in listed}[p["model"]] == 5000


def test_prune_by_age_by_size_or_all_never_touches_the_store_or_a_live_engine(tmp_path):
    p = _make(tmp_path, time.time())
    old = prune(tmp_path, older_than_s=15 * DAY, dry_run=True)
    assert {e.path for e in old} == {p["dead"], p["svd_old"]} and p["dead"].exists()  # dry: nothing removed
    # 15,000 prunable bytes; fit in 9,000, keeping the model: least recently used go first
    sized = prune(tmp_path, max_bytes=9000, keep=(p["model"],))
    assert [e.path for e in sized] == [p["dead"], p["svd_old"], p["training"]]
    assert not p["svd_old"].exists() and p["model"].exists() and p["live"].exists()
    rest = prune(tmp_path, kinds=("svd",))
    assert [e.path for e in rest] == [p["svd_new"]]
    prune(tmp_path)
    assert p["store"].exists() and p["live"].exists() and not p["model"].exists()


def test_the_cli_lists_and_prunes(tmp_path, capsys):
    p = _make(tmp_path, time.time())
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "svd" in out and str(p["store"]) in out and "never pruned" in out
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--kind", "vllm", "--dry-run"]) == 0
    assert "would remove 1 entries" in capsys.readouterr().out and p["dead"].exists()
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--older-than-days", "15"]) == 0
    assert not p["svd_old"].exists() and p["svd_new"].exists()


def test_the_server_cap_keeps_what_it_loaded(tmp_path):
    from server.app import _cap_cache
    from server.config import Settings

    now = time.time()
    p = _make(tmp_path, now)
    os.utime(p["model"], (now, now))  # loaded by this server
    _cap_cache(Settings(cache_dir=tmp_path, cache_max_gb=6000 / 1e9), started=now - 1)
    left = {e.path for e in entries(tmp_path)}
    assert p["model"] in left and p["live"] in left and p["store"] in left
    assert sum(e.size for e in entries(tmp_path) if e.prunable) <= 6000 + 5000  # the kept model may exceed the cap


def test_a_cache_hit_marks_the_svd_file_used_and_the_listing_says_what_it_holds(tmp_path):
    w = torch.randn(6, 4)
    t = [Target("m.w", "linear", 6, 4)]
    load_or_compute_matrices([w], t, tmp_path / "svd", progress=False)
    f = next((tmp_path / "svd").glob("*.safetensors"))
    os.utime(f, (1, 1))
    load_or_compute_matrices([w], t, tmp_path / "svd", progress=False)
    assert f.stat().st_mtime > time.time() - 60
    save_file({"x": torch.zeros(1)}, str(tmp_path / "svd" / "other.safetensors"))
    about = {e.path.name: e.about for e in entries(tmp_path)}
    assert about[f.name] == "1 matrices, m.w ..." and about["other.safetensors"] == "0 matrices"
