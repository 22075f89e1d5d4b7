"""The training objectives on a tiny model: gradients reach every z through the composition, an Adam
step on fixed rollouts lowers the REINFORCE loss, micro-batching does not change the gradient, and the
KL term is zero for a neutral expert."""
from __future__ import annotations

import pytest
import torch

from adapters import Adaptation, SVFExpert
from adapters.svf import init_z, neutral_z
from experts.train.model import load_base
from experts.train.objective import next_token_loss, pack, reinforce_loss, scored_logprobs

PROMPTS = [[5, 17, 99, 4], [8, 3, 250, 41, 7, 2]]
REPLIES = [[31, 32, 33], [70, 71]]


@pytest.fixture(scope="module")
def base(tiny_llama_dir, tmp_path_factory):
    return load_base(str(tiny_llama_dir), device="cpu", dtype="float32", cache_dir=tmp_path_factory.mktemp("c"))


def live_z(base, parametrization="sakana", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.nn.Parameter(init_z(t.rank, parametrization, g)) for t in base.runtime.targets}


def pg_loss(base, z, rewards, micro=2, kl_coef=0.0):
    rt, live = base.runtime, Adaptation.expert(SVFExpert("t", z))
    total = torch.zeros(())
    for s in range(0, len(PROMPTS), micro):
        batch = pack(PROMPTS[s:s + micro], REPLIES[s:s + micro], 0, "cpu")
        with rt.activate(rt.plan([live] * batch.rows)):
            logp, kl, _ = scored_logprobs(base.model, batch, rt.activate(None) if kl_coef else None)
            loss = reinforce_loss(logp, rewards[s:s + micro], kl, kl_coef, len(PROMPTS))
        loss.backward()
        total = total + loss.detach()
    return total


def test_gradient_reaches_every_z_and_a_step_lowers_the_loss(base):
    z = live_z(base)
    rewards = torch.tensor([1.0, -1.0])
    before = pg_loss(base, z, rewards)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in z.values())
    opt = torch.optim.Adam(z.values(), lr=2e-3)
    torch.nn.utils.clip_grad_norm_(z.values(), 1e-3)
    opt.step()
    opt.zero_grad()
    after = pg_loss(base, z, rewards)
    assert after < before


def test_micro_batches_add_up_to_the_batch_gradient(base):
    rewards = torch.tensor([1.0, -1.0])
    whole, split = live_z(base), live_z(base)
    a = pg_loss(base, whole, rewards, micro=2, kl_coef=0.2)
    b = pg_loss(base, split, rewards, micro=1, kl_coef=0.2)
    assert torch.allclose(a, b, atol=1e-5)
    for n in whole:
        assert torch.allclose(whole[n].grad, split[n].grad, rtol=1e-3, atol=1e-6)


def test_logprobs_match_a_plain_forward_and_kl_of_a_neutral_expert_is_zero(base):
    rt = base.runtime
    z = {t.name: neutral_z(t.rank, "sakana") for t in rt.targets}
    batch = pack(PROMPTS, REPLIES, 0, "cpu")
    with rt.activate(rt.plan([Adaptation.expert(SVFExpert("n", z))] * 2)):
        logp, kl, n = scored_logprobs(base.model, batch, rt.activate(None))
    assert n.tolist() == [3.0, 2.0] and kl.abs().max() < 1e-5
    with torch.no_grad():  # the reference: log-softmax of the unadapted model's logits
        logits = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
    for i, (p, r) in enumerate(zip(PROMPTS, REPLIES)):
        ref = sum(logits[i, len(p) - 1 + j, tok] for j, tok in enumerate(r))
        assert torch.allclose(logp[i], ref, atol=1e-4)
    assert torch.allclose(next_token_loss(logp, 5), -logp.sum() / 5)
