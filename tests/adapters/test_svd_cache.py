"""SVD factors: exact, computed once, cached on disk, rebuilt when the file cannot be trusted."""
import logging

import pytest
import torch

from adapters.svd_cache import cache_key, load_or_compute, weights_fingerprint
from adapters.targets import find_targets, weight_matrix
from tests.support.adapt import tiny_model


@pytest.fixture
def svd_calls(monkeypatch):
    """Every matrix factorised (whichever driver ``thin_svd`` uses)."""
    import adapters.svd_cache as svd_cache

    calls = []
    real = svd_cache.thin_svd

    def counting(w):
        calls.append(w.shape)
        return real(w)

    monkeypatch.setattr(svd_cache, "thin_svd", counting)
    return calls


def _weights(model, targets):
    return [weight_matrix(model.get_submodule(t.name).weight, t.kind) for t in targets]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_factors_reconstruct_weights(arch):
    model = tiny_model(arch)
    targets = find_targets(model, "all")
    factors = load_or_compute(model, targets, None, progress=False)
    for t, w in zip(targets, _weights(model, targets)):
        f = factors[t.name]
        assert f.U.shape == (t.out_features, t.rank) and f.Vh.shape == (t.rank, t.in_features)
        assert f.U.dtype == w.dtype and f.S.dtype == torch.float32
        assert torch.all(f.S[:-1] >= f.S[1:])
        assert (f.U * f.S @ f.Vh - w).abs().max() < 1e-5


def test_second_start_reuses_cache(tmp_path, svd_calls):
    model = tiny_model("llama")
    targets = find_targets(model, "mlp")
    first = load_or_compute(model, targets, tmp_path, progress=False)
    assert len(svd_calls) == len(targets) == 6
    files = [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # the writers' lock file stays
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp file left behind
    second = load_or_compute(model, targets, tmp_path, progress=False)
    assert len(svd_calls) == 6  # nothing recomputed
    for t in targets:
        assert torch.equal(first[t.name].U, second[t.name].U) and torch.equal(first[t.name].S, second[t.name].S)


def test_key_follows_weights_and_target_set(tmp_path):
    model = tiny_model("llama")
    mlp, attn = find_targets(model, "mlp"), find_targets(model, "attn")
    fp = weights_fingerprint(_weights(model, mlp))
    assert cache_key(fp, mlp) != cache_key(fp, mlp[:3])
    assert weights_fingerprint(_weights(model, attn)) != fp
    with torch.no_grad():  # one value changes, far from the sampled ones: the sum still moves
        model.model.layers[1].mlp.up_proj.weight[17, 5] += 1e-3
    assert weights_fingerprint(_weights(model, mlp)) != fp
    other = tiny_model("llama", seed=1)
    assert weights_fingerprint(_weights(other, mlp)) != fp


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, svd_calls, caplog, damage):
    model = tiny_model("llama")
    targets = find_targets(model, "mlp")
    good = load_or_compute(model, targets, tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":  # a few bytes inside the tensor data: the file still parses
        for i in range(len(data) - 400, len(data) - 380):
            data[i] ^= 0x5A
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\x00garbage" * 10)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="adapters.svd_cache"):
        rebuilt = load_or_compute(model, targets, tmp_path, progress=False)
    assert "corrupt or partial" in caplog.text
    assert len(svd_calls) == 2 * len(targets)
    for t in targets:
        torch.testing.assert_close(rebuilt[t.name].S, good[t.name].S)
    svd_calls.clear()
    load_or_compute(model, targets, tmp_path, progress=False)  # the rebuilt file is valid again
    assert svd_calls == []


def test_factors_follow_model_dtype(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    targets = find_targets(model, "mlp")
    for cached in (False, True):
        f = load_or_compute(model, targets, tmp_path, progress=False)[targets[0].name]
        assert f.U.dtype == f.Vh.dtype == torch.bfloat16 and f.S.dtype == torch.float32, cached


def test_fingerprint_of_a_large_matrix():
    # 2^24 + 4 values: a float32 linspace to the last index (2^24 + 3) rounds it out of range
    big = torch.zeros(2**24 + 4, dtype=torch.int8)
    fp = weights_fingerprint([big])
    big[-1] = 1  # the last value is always sampled
    assert weights_fingerprint([big]) != fp


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_the_gram_svd_is_an_svd(shape):
    from adapters.svd_cache import gram_svd

    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    U, S, Vh = gram_svd(w)
    k = min(shape)
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vh.shape == (k, shape[1])
    torch.testing.assert_close((U * S) @ Vh, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, torch.linalg.svd(w, full_matrices=False)[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k), atol=1e-5, rtol=0)
    assert torch.all(S[:-1] >= S[1:])  # descending, as the experts' z are indexed
    low = U[:, :3] @ Vh[:3]  # rank 3: the null directions come out as zeros, not inf
    U2, S2, Vh2 = gram_svd(low)
    assert torch.isfinite(U2).all() and torch.isfinite(Vh2).all()
    torch.testing.assert_close((U2 * S2) @ Vh2, low, rtol=1e-4, atol=1e-4)
