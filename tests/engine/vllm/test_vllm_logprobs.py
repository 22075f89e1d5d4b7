"""vLLM's two logprobs forms (vLLM 0.25: a dict of Logprob per position, or FlatLogprobs' lists) read alike."""
from types import SimpleNamespace

from engine.vllm.engine import vllm_logprobs


def _positions():
    # per position: the sampled token and its rank, then the top 3 (ids, logprobs) by rank, as vLLM's sampler
    # returns them; at position 1 the sampled token is also the best one
    return [((7, 4, -2.5), [(3, -0.5), (9, -1.0), (5, -2.0)]),
            ((3, 1, -0.25), [(3, -0.25), (8, -1.5), (2, -3.0)]),
            ((6, 2, -0.75), [(1, -0.5), (6, -0.75), (4, -2.25)])]


def _dict_form():
    out = []
    for (tok, rank, lp), top in _positions():
        entry = {tok: SimpleNamespace(logprob=lp, rank=rank)}
        for r, (t, v) in enumerate(top, 1):
            entry[t] = SimpleNamespace(logprob=v, rank=r)
        out.append(entry)
    return out


def _flat_form():
    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[], ranks=[])
    for (tok, rank, lp), top in _positions():
        flat.start_indices.append(len(flat.token_ids))
        for t, v, r in [(tok, lp, rank)] + [(t, v, r) for r, (t, v) in enumerate(top, 1)]:
            flat.token_ids.append(t)
            flat.logprobs.append(v)
            flat.ranks.append(r)
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_flat_and_dict_logprobs_give_the_same_tokens():
    tokens = [tok for (tok, _, _), _ in _positions()]
    for k in (1, 2, 3):
        a = vllm_logprobs(SimpleNamespace(token_ids=tokens, logprobs=_dict_form()), k)
        b = vllm_logprobs(SimpleNamespace(token_ids=tokens, logprobs=_flat_form()), k)
        assert a == b
        assert [t.logprob for t in a] == [-2.5, -0.25, -0.75]
        assert [len(t.top) for t in a] == [k] * 3
    assert vllm_logprobs(SimpleNamespace(token_ids=tokens, logprobs=_flat_form()), 2)[2].top == [(1, -0.5), (6, -0.75)]
    assert vllm_logprobs(SimpleNamespace(token_ids=tokens, logprobs=None), 2) is None
