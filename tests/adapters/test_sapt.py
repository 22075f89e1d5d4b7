"""SAPT: per-request attention over task blocks, mixed as one rank-T·r LoRA per target."""
import copy

import pytest
import torch

from adapters import Adaptation, SAPTBundle, install
from adapters.sapt import mix_soft_prompts, pool_query
from adapters.targets import weight_matrix
from tests.support.adapt import VOCAB, logits, random_expert, tiny_model, with_merged_weights


def _setup(arch="llama", num_tasks=3, prompt_len=0, targets=("q_proj", "v_proj", "c_attn")):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    names = [t for t in targets if any(n.endswith(t) for n, _ in model.named_modules())]
    runtime = install(model, ["mlp", *names], None, progress=False)
    shapes = {t.name: (t.out_features, t.in_features) for t in runtime.targets if not ".mlp." in t.name}
    torch.manual_seed(1)
    bundle = SAPTBundle(shapes, d_model=32, num_tasks=num_tasks, rank=4, alpha=8, prompt_len=prompt_len)
    with torch.no_grad():  # trained-looking blocks: B is zero at init
        for task in bundle.tasks:
            for b in task.B:
                b.normal_(0, 0.1)
    bundle.requires_grad_(False)
    return base, model, runtime, bundle


def _with_lora(base, bundle, attention, ref=None):
    """Plain model with W + Σ_t a_t (alpha/r) B_t A_t folded into each target's weight."""
    ref = copy.deepcopy(base) if ref is None else ref
    with torch.no_grad():
        for i, name in enumerate(bundle.target_names):
            module = ref.get_submodule(name)
            kind = "conv1d" if type(module).__name__ == "Conv1D" else "linear"
            W = weight_matrix(module.weight, kind)
            for a, task in zip(attention.tolist(), bundle.tasks):
                W += a * bundle.scaling * task.B[i] @ task.A[i]
    return ref


def _ids(batch=3, length=6):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def _run(model, runtime, rows, ids):
    with torch.no_grad(), runtime.activate(runtime.plan(rows)):
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_hot_attention_equals_that_lora(arch):
    base, model, runtime, bundle = _setup(arch)
    ids = _ids(4)
    one_hot = torch.eye(3)
    rows = [Adaptation.sapt_weights(bundle, one_hot[t]) for t in (0, 2, 1)] + [None]
    out = _run(model, runtime, rows, ids)
    for i, t in enumerate((0, 2, 1)):
        ref = logits(_with_lora(base, bundle, one_hot[t]), ids[i:i + 1])
        assert (out[i:i + 1] - ref).abs().max().item() <= 1e-4
    assert (out[3] - logits(base, ids)[3]).abs().max().item() <= 1e-5  # no SAPT, no SVF: base
    assert (out[0] - logits(base, ids)[0]).abs().max() > 1e-3  # the block does something


def test_soft_mixture_and_svf_together():
    base, model, runtime, bundle = _setup()
    e = random_expert(runtime, "x", seed=2, scale=0.5)
    a = torch.tensor([0.2, 0.5, 0.3])
    svf_only = Adaptation.expert(e)
    both = Adaptation(svf=svf_only.svf, sapt=Adaptation.sapt_weights(bundle, a).sapt)
    ids = _ids(2)
    out = _run(model, runtime, [both, Adaptation.sapt_weights(bundle, a)], ids)
    ref_both = logits(_with_lora(base, bundle, a, ref=with_merged_weights(base, runtime, svf_only)), ids)
    ref_sapt = logits(_with_lora(base, bundle, a), ids)
    assert (out[0] - ref_both[0]).abs().max().item() <= 1e-4
    assert (out[1] - ref_sapt[1]).abs().max().item() <= 1e-4


def test_weights_do_not_depend_on_batch_padding():
    base, model, runtime, bundle = _setup()
    embed = model.get_input_embeddings()
    pad = 0
    with torch.no_grad():
        embed.weight[pad] = 5.0  # a pad embedding larger than any token's: an unmasked max would see it
        prompt = torch.tensor([[7, 3, 9, 11]])
        alone = bundle.attention(embed(prompt), torch.ones(1, 4))
        other = torch.tensor([[5, 6, 7, 8, 9, 10, 12]])
        for side in ("left", "right"):
            padded = torch.full((2, 7), pad)
            padded[1] = other
            if side == "left":
                padded[0, 3:] = prompt
            else:
                padded[0, :4] = prompt
            mask = padded != pad
            batch = bundle.attention(embed(padded), mask)
            torch.testing.assert_close(batch[0], alone[0], rtol=0, atol=1e-7)
        unmasked = bundle.attention(embed(padded), torch.ones_like(mask))
        assert (unmasked[0] - alone[0]).abs().max() > 1e-4  # masking is what makes it invariant
    with pytest.raises(ValueError, match="at least one"):
        pool_query(torch.zeros(1, 3, 32), torch.zeros(1, 3))


def test_attention_formula():
    _, _, _, bundle = _setup()
    with torch.no_grad():
        emb = torch.randn(2, 5, 32)
        mask = torch.ones(2, 5)
        q = bundle.query_proj(emb.amax(1))  # Linear→Linear→SiLU→LayerNorm of the max-pooled tokens
        expect = torch.softmax(q @ bundle.keys().t() / 32 ** 0.5, dim=-1)
        torch.testing.assert_close(bundle.attention(emb, mask), expect)
    assert bundle.query_proj.down.weight.shape == (100, 32) and bundle.query_proj.down.bias is None


def test_soft_prompts_mixed_by_the_same_weights():
    _, _, _, bundle = _setup(prompt_len=5)
    a = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])
    mixed = bundle.mixed_prompts(a)
    assert mixed.shape == (2, 5, 32)
    torch.testing.assert_close(mixed[0], bundle.tasks[1].prompt)
    expect = 0.5 * bundle.tasks[0].prompt + 0.25 * bundle.tasks[1].prompt + 0.25 * bundle.tasks[2].prompt
    torch.testing.assert_close(mixed[1], expect)
    torch.testing.assert_close(mix_soft_prompts(torch.ones(3, 2, 4), a), torch.ones(2, 2, 4))


def test_new_task_starts_as_noop_and_stack_cache_follows_updates():
    _, _, _, bundle = _setup()
    first = bundle.stacked_lora()
    assert bundle.stacked_lora() is first  # cached while nothing changed
    name = bundle.target_names[0]
    bundle.add_task()
    A_cat, B_cat = bundle.stacked_lora()[name]
    assert A_cat.shape == (4 * 4, 32) and torch.all(B_cat[:, 12:] == 0)  # new block: B = 0
    with torch.no_grad():
        bundle.tasks[0].B[0].mul_(2)  # an optimizer-style in-place update
    assert torch.equal(bundle.stacked_lora()[name][1][:, :4], bundle.tasks[0].B[0] * bundle.scaling)


def test_gradients_reach_only_weighted_blocks():
    base, model, runtime, bundle = _setup()
    bundle.requires_grad_(True)
    for task in bundle.tasks[:2]:
        task.requires_grad_(False)  # older tasks frozen, as in continual learning
    a = torch.tensor([0.3, 0.7, 0.0])
    rows = [Adaptation.sapt_weights(bundle, a)]
    with runtime.activate(runtime.plan(rows)):
        model(input_ids=_ids(1), use_cache=False).logits.square().mean().backward()
    assert bundle.tasks[0].B[0].grad is None
    assert bundle.tasks[2].B[0].grad is not None and torch.all(bundle.tasks[2].B[0].grad == 0)  # a_3 = 0
    bundle.tasks[1].requires_grad_(True)
    with runtime.activate(runtime.plan(rows)):
        model(input_ids=_ids(1), use_cache=False).logits.square().mean().backward()
    assert bundle.tasks[1].B[0].grad.abs().max() > 0


def test_gradient_reaches_keys_and_query_projection():
    base, model, runtime, bundle = _setup()
    bundle.requires_grad_(True)
    ids = _ids(2)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)  # frozen input embeddings
    attn = bundle.attention(embeds, torch.ones_like(ids))  # (2, T), differentiable
    rows = [Adaptation.sapt_weights(bundle, attn[i]) for i in range(2)]
    with runtime.activate(runtime.plan(rows)):
        model(input_ids=ids, use_cache=False).logits.square().mean().backward()
    assert bundle.tasks[1].key.grad.abs().max() > 0
    assert bundle.query_proj.down.weight.grad.abs().max() > 0


def test_frozen_bundle_keeps_its_version_until_a_task_is_added():
    bundle = SAPTBundle({"m": (8, 8)}, d_model=8, num_tasks=2, rank=2)
    v0 = bundle.version()
    with torch.no_grad():
        bundle.tasks[0].B[0].add_(1.0)
    v1 = bundle.version()
    assert v1 != v0  # training is seen through the in-place counters
    bundle.freeze()
    assert bundle.version() == v1 and not any(p.requires_grad for p in bundle.parameters())
    bundle.add_task()
    assert bundle.version() != v1 and bundle.version()[1] == 3
