"""Fixtures of the SAPT tests: the tiny random Llama loaded for training (LoRA targets q_proj and v_proj
installed), and small run settings."""
from __future__ import annotations

from dataclasses import replace

import pytest

from experts.sapt.config import SAPTConfig

TINY = dict(steps=4, batch_size=4, micro_batch=2, lr=5e-3, router_lr=2e-2, train_limit=32, val_limit=4,
            test_limit=4, generator_steps=2, min_pseudo=4, arm_batch=4, max_num_seqs=8, device="cpu", threads=1)


@pytest.fixture(scope="session")
def tiny_base(tiny_llama_dir, tmp_path_factory):
    from experts.train.model import load_base

    cfg = SAPTConfig(tasks="reverse")
    return load_base(str(tiny_llama_dir), device="cpu", dtype="float32", targets=cfg.target_patterns,
                     cache_dir=tmp_path_factory.mktemp("sapt-cache"))


@pytest.fixture
def tiny_cfg(tiny_llama_dir, tmp_path):
    """SAPTConfig(**overrides) for the tiny model, writing under tmp_path."""

    def make(tasks: str = "reverse,upper", **overrides) -> SAPTConfig:
        cfg = SAPTConfig(tasks=tasks, model=str(tiny_llama_dir), run_dir=str(tmp_path / "run"), **TINY)
        return replace(cfg, **overrides)

    return make
