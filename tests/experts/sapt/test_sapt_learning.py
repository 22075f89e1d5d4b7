"""SAPT continual learning on the tiny random Llama: growth of the bundle, frozen old tasks, routing
without padding effects, loss going down, exact resume, and the metrics."""
import copy
import json

import pytest
import torch

from experts.pass1.resolver import sapt_attention
from experts.sapt import checkpoint
from experts.sapt.data import TaskPool
from experts.sapt.evaluate import Evaluator
from experts.sapt.learner import SequenceLearner
from experts.sapt.metrics import all_metrics, lower_triangle
from experts.sapt.routing import arm_kl, prompt_attention, serving_copy
from experts.sapt.run import train_sequence


def _learner(cfg, base):
    pool = TaskPool(base.tokenizer, None, cfg.train_limit, cfg.val_limit, cfg.test_limit)
    return SequenceLearner(cfg, base, pool, Evaluator(base, cfg.max_num_seqs)), pool


def _frozen_part(task):
    return [t.detach().clone() for t in (*task.A, *task.B, task.key)]


def test_keys_grow_and_old_blocks_and_keys_stay_bitwise_frozen(tiny_cfg, tiny_base):
    cfg = tiny_cfg("reverse,upper,count")
    learner, pool = _learner(cfg, tiny_base)
    d = tiny_base.model.config.hidden_size
    prompts = pool.get("count").test_prompts
    before, query_before = [], None
    for i, name in enumerate(cfg.task_list):
        learner.learn(name, i)
        bundle = learner.bundle
        assert bundle.num_tasks == i + 1 and bundle.keys().shape == (i + 1, d)
        assert all(A.shape[0] == cfg.rank for A in bundle.tasks[-1].A)
        assert prompt_attention(tiny_base.model, bundle, prompts).shape == (len(prompts), i + 1)
        assert learner.mean_attn[i].shape == (i + 1,) and len(learner.pseudo[i]) >= 1  # ARM's bookkeeping
        for j, old in enumerate(before):  # every older block and key: bitwise what it was
            assert all(torch.equal(a, b) for a, b in zip(old, _frozen_part(bundle.tasks[j]))), f"task {j} changed"
        assert any(B.abs().max() > 0 for B in bundle.tasks[-1].B)  # the new block trained (B starts at 0)
        query = bundle.query_proj.down.weight.detach().clone()
        assert (query @ learner.shared_dir).abs().max() < 1e-5  # blind to what all prompts share
        if i >= 1:  # the shared query projection keeps learning (a single task gets attention 1 whatever it does)
            assert not torch.equal(query, query_before)
        query_before = query
        before.append(_frozen_part(bundle.tasks[-1]))


class _PadHeavyEmbedding(torch.nn.Module):
    """The model's embeddings with the padding id's row made larger than any token's: an unmasked max
    over a padded batch would pick it."""

    def __init__(self, model):
        super().__init__()
        self.emb = copy.deepcopy(model.get_input_embeddings())
        with torch.no_grad():
            self.emb.weight[0] = 5.0

    def get_input_embeddings(self):
        return self.emb


def test_padding_does_not_change_attention_and_matches_the_server(tiny_cfg, tiny_base):
    cfg = tiny_cfg("reverse,upper", steps=3)
    learner, pool = _learner(cfg, tiny_base)
    for i, name in enumerate(cfg.task_list):
        learner.learn(name, i, make_pseudo=False)
    served = serving_copy(learner.bundle)
    prompts = [pool.get("reverse").test_prompts[0][:9], pool.get("upper").test_prompts[1], [5, 6, 7]]
    assert len({len(p) for p in prompts}) == 3  # right padding of different lengths in one batch
    heavy = _PadHeavyEmbedding(tiny_base.model)
    batch = prompt_attention(heavy, served, prompts)
    for i, p in enumerate(prompts):
        alone = prompt_attention(heavy, served, [p])[0]
        torch.testing.assert_close(batch[i], alone, rtol=0, atol=1e-6)
        # what the server's sapt strategy computes for this prompt, from the unmodified model
        server = sapt_attention(tiny_base.model, served, p)
        torch.testing.assert_close(prompt_attention(tiny_base.model, served, [p])[0], server, rtol=0, atol=1e-6)
    with torch.no_grad():
        trained = prompt_attention(tiny_base.model, learner.bundle, prompts)
    torch.testing.assert_close(trained, prompt_attention(tiny_base.model, served, prompts))  # the served copy


def test_two_task_run_lowers_the_loss(tiny_cfg):
    # the same 4 examples every step: a random tiny model can only learn them by heart, and does
    cfg = tiny_cfg("reverse,upper", steps=12, method="sapt_noarm", eval_every_task=0, train_limit=4, lr=0.05)
    train_sequence(cfg)
    recs = [json.loads(x) for x in open(f"{cfg.run_dir}/log.jsonl") if x.strip()]
    for task in ("reverse", "upper"):
        losses = [r["loss"] for r in recs if r["event"] == "step" and r["task"] == task]
        assert len(losses) == 12
        # the new block starts at a share of the mixture (~1/4 here), so its task learns more slowly
        assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, (task, losses)


@pytest.mark.slow  # three SAPT runs (~11 s on 2 cores)
def test_resume_continues_the_sequence_exactly(tiny_cfg, tmp_path):
    whole = tiny_cfg("reverse,upper", run_dir=str(tmp_path / "whole"))
    train_sequence(whole)
    split = tiny_cfg("reverse", run_dir=str(tmp_path / "split"))
    train_sequence(split)
    with pytest.raises(FileExistsError, match="--resume"):
        train_sequence(tiny_cfg("reverse,upper", run_dir=split.run_dir))
    with pytest.raises(ValueError, match="recipe differs in lr"):
        train_sequence(tiny_cfg("reverse,upper", run_dir=split.run_dir, lr=1e-4), resume=True)
    with pytest.raises(ValueError, match="must start with"):
        train_sequence(tiny_cfg("upper,reverse", run_dir=split.run_dir), resume=True)
    summary = train_sequence(tiny_cfg("reverse,upper", run_dir=split.run_dir), resume=True)
    assert summary["tasks"] == ["reverse", "upper"]
    a, _ = checkpoint.load(tmp_path / "whole")
    b, _ = checkpoint.load(tmp_path / "split")
    assert a["tensors"].keys() == b["tensors"].keys()
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    assert a["mean_attn"] == b["mean_attn"] and a["pseudo"] == b["pseudo"] and a["rows"] == b["rows"]


def test_arm_kl():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
    expect = (1.0 * torch.log(torch.tensor(1 / 0.5)) + 0.0) / 2  # second row: KL 0 (zeros of p count 0)
    torch.testing.assert_close(arm_kl(p, q), expect)
    assert float(arm_kl(q, q)) == pytest.approx(0.0, abs=1e-7)


def test_metrics_on_a_hand_made_matrix():
    tasks = ["a", "b", "c"]
    rows = [{"a": 0.9}, {"a": 0.6, "b": 0.8}, {"a": 0.3, "b": 0.7, "c": 1.0}]
    a = lower_triangle(rows, tasks)
    assert a == [[0.9], [0.6, 0.8], [0.3, 0.7, 1.0]]
    m = all_metrics(a, alone=[0.8, 0.8, 0.9])
    assert m["AP"] == pytest.approx((0.3 + 0.7 + 1.0) / 3)
    assert m["F.Ra"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)  # best once learned, minus the last
    assert m["BWT"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)  # divided by T-1
    assert m["FWT"] == pytest.approx(((0.9 - 0.8) + (0.8 - 0.8) + (1.0 - 0.9)) / 3)
    # a full matrix (scores before learning above the diagonal) gives the same numbers
    full = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.3, 0.7, 1.0]]
    assert all_metrics(full, [0.8, 0.8, 0.9]) == m
    # F.Ra takes the best score after learning, not the first: a task that improved later
    assert all_metrics([[0.5], [0.9, 0.7], [0.6, 0.7, 0.7]])["F.Ra"] == pytest.approx(((0.9 - 0.6) + 0.0) / 2)
    one = all_metrics([[0.4]])
    assert one["AP"] == 0.4 and one["F.Ra"] is None and one["BWT"] is None and one["FWT"] is None
    with pytest.raises(ValueError):
        all_metrics([[0.1, 0.2]])
