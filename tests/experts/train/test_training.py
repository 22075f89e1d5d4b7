"""SVF training on a tiny random Llama: the loss goes down, a valid expert lands in the store, REINFORCE
with KL and sampled rollouts runs through the engine, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from experts.train import checkpoint
from experts.train.config import TrainConfig
from experts.train.model import load_base
from experts.store.expert_file import read_expert_file
from experts.train.trainer import SVFTrainer
from tests.support.train_data import write_arc

TIMING = ("gen_s", "train_s", "val_s")


@pytest.fixture(scope="module")
def base(tiny_llama_dir, tmp_path_factory):
    return load_base(str(tiny_llama_dir), device="cpu", dtype="float32", targets="mlp",
                     cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_arc(tmp_path_factory.mktemp("data")))


def config(data, run_dir, **kw) -> TrainConfig:
    fields = dict(task="arc-easy", data=data, run_dir=str(run_dir), batch_size=2, micro_batch=1, max_tokens=6,
                  max_model_len=512, train_limit=4, seed=3)
    return TrainConfig(**{**fields, **kw})


def steps(run_dir) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_two_steps_lower_the_loss_and_store_a_valid_expert(base, data, tmp_path):
    from experts.store.base_model import BaseModelInfo
    from experts.store.expert_store import ExpertStore

    run = tmp_path / "run"
    cfg = config(data, run, objective="next_token", train_limit=2, epochs=2, lr=1e-2, store=str(tmp_path / "store"),
                 name="arc-tiny")
    summary = SVFTrainer(cfg, base).run()
    losses = [r["loss"] for r in steps(run) if r["event"] == "step"]
    assert len(losses) == 2 and losses[1] < losses[0]  # the same batch twice: the first step helped
    expert, meta = read_expert_file(run / "expert.safetensors")
    assert set(expert.z) == {t.name for t in base.runtime.targets} and meta["category"] == "reasoning"
    store = ExpertStore(tmp_path / "store", base=BaseModelInfo.from_model(base.model, "tiny",
                                                                            targets=base.runtime.targets))
    store.load()
    stored = store.get("arc-tiny")
    assert stored is not None and stored.ready and stored.record.source == "training"
    assert stored.record.category == "reasoning" and stored.record.parametrization == "sakana"
    assert all(torch.equal(stored.payload.z[n], expert.z[n]) for n in expert.z)
    assert summary["stored"].endswith("arc-tiny v1")
    assert summary["best_step"] in (0, 1, 2)
    if importlib.util.find_spec("matplotlib"):
        assert (run / "curves.png").stat().st_size > 1000


def test_reinforce_with_kl_and_sampled_rollouts(base, data, tmp_path):
    run = tmp_path / "run"
    cfg = config(data, run, kl_coef=0.1, rollout="sample", max_steps=2, parametrization="direct",
                 targets="mlp", baseline="mean")
    SVFTrainer(cfg, base).run()
    recs = steps(run)
    step_recs = [r for r in recs if r["event"] == "step"]
    assert len(step_recs) == 2 and all(r["reward"] in (-1.0, 0.0, 1.0) for r in step_recs)
    assert all(r["kl"] >= 0 and r["tokens"] > 0 for r in step_recs)
    assert [r["step"] for r in recs if r["event"] == "val"] == [0, 1, 2]
    expert, meta = read_expert_file(run / "expert.safetensors")
    assert expert.parametrization == "direct" and meta["objective"] == "reinforce"


def test_a_checkpoint_without_resume_is_refused(base, data, tmp_path):
    SVFTrainer(config(data, tmp_path, max_steps=1, objective="next_token"), base).run()
    with pytest.raises(FileExistsError):
        SVFTrainer(config(data, tmp_path, max_steps=2, objective="next_token"), base)
    with pytest.raises(ValueError, match="lr"):
        SVFTrainer(config(data, tmp_path, max_steps=2, objective="next_token", lr=0.1), base, resume=True)


class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(base, data, tmp_path, monkeypatch):
    recipe = dict(kl_coef=0.1, rollout="sample", epochs=2, val_every=2)  # 2 steps per epoch, 4 in all
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    SVFTrainer(config(data, whole, **recipe), base).run()
    step = SVFTrainer.train_step

    def killed_before_step_4(self):
        if self.step == 3:
            raise Interrupted
        return step(self)

    monkeypatch.setattr(SVFTrainer, "train_step", killed_before_step_4)
    with pytest.raises(Interrupted):
        SVFTrainer(config(data, parts, **recipe), base).run()
    monkeypatch.undo()
    # As if the process died after logging step 4 but before its checkpoint: the log runs ahead.
    with open(parts / "log.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": 4, "loss": 123.0}) + "\n")
    SVFTrainer(config(data, parts, **recipe), base, resume=True).run()
    a, b = checkpoint.load(whole), checkpoint.load(parts)
    assert a.step == b.step == 4 and a.adam_step == b.adam_step
    for group in ("z", "exp_avg", "exp_avg_sq", "best_z"):
        ga, gb = getattr(a, group), getattr(b, group)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga), group
    assert (a.best_val, a.best_step) == (b.best_val, b.best_step)
    assert steps(whole) == steps(parts)  # same losses, rewards, KL, grad norms, validation, in the same order


def test_store_when_improved_keeps_an_unimproved_expert_out_of_the_store(base, data, tmp_path):
    from experts.store.expert_store import ExpertStore

    with pytest.raises(ValueError):
        config(data, tmp_path / "bad", store_when="sometimes")
    run = tmp_path / "run"
    # lr 0: no trained step can beat step 0 (the base) on validation, so nothing is stored.
    cfg = config(data, run, objective="next_token", train_limit=2, max_steps=1, lr=0.0, store=str(tmp_path / "store"),
                 name="arc-same", store_when="improved")
    summary = SVFTrainer(cfg, base).run()
    assert summary["best_step"] == 0 and summary["stored"] is None
    assert (run / "expert.safetensors").exists()
    assert not (tmp_path / "store").exists() or ExpertStore(tmp_path / "store").load() == []
