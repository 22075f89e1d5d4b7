"""The experts shipped for the embedded SmolLM2: installed into a store once, only for their base model."""
from __future__ import annotations

import pytest
import torch

from experts.store.base_model import BaseModelInfo
from experts.store.expert_store import ExpertStore
from experts.store.shipped import MARKER, install_shipped, shipped_files

SHIPPED = {"arc-easy-text": "reasoning", "classifier": "classifier", "gsm8k": "math", "mbpp": "code",
           "mini-mul": "multiplication", "mini-add": "addition", "mini-last": "letters",
           "mini-bracket": "format"}


@pytest.fixture(scope="module")
def smol_base(smollm2_dir) -> BaseModelInfo:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return BaseModelInfo.from_model(model, "smollm2", target_spec="mlp")


@pytest.mark.integration
def test_installed_once_for_their_model_and_deletions_stay(tmp_path, smol_base):
    assert {p.stem for p in shipped_files()} == set(SHIPPED)
    store = ExpertStore(tmp_path, base=smol_base)
    store.load()
    assert sorted(install_shipped(store)) == sorted(SHIPPED)
    for name, category in SHIPPED.items():
        stored = store.get(name)
        assert stored is not None and stored.ready and stored.record.category == category
        assert stored.record.source == "shipped"
    assert install_shipped(store) == []  # already there
    store.delete("gsm8k")
    reopened = ExpertStore(tmp_path, base=smol_base)
    reopened.load()
    assert install_shipped(reopened) == []  # a deleted shipped expert is not brought back
    assert reopened.get("gsm8k") is None and reopened.get("mbpp") is not None
    assert (tmp_path / MARKER).exists()


def test_not_installed_for_another_model(tmp_path, base_mlp):
    store = ExpertStore(tmp_path, base=base_mlp)
    store.load()
    assert install_shipped(store) == []
    assert store.list() == []


@pytest.mark.integration
def test_ship_stamps_the_served_models_fingerprint(tmp_path, smol_base, smollm2_dir):
    """`ship` copies a trained expert under its new name with the fingerprint of the model folder's weights,
    which is what makes `install_shipped` put it into a store serving that model."""
    from experts.store.shipped import ship
    from experts.store.expert_file import read_expert_file

    src = shipped_files()[0]
    (dst,) = ship({"copy": src}, smollm2_dir, tmp_path / "builtin")
    expert, meta = read_expert_file(dst)
    original, _ = read_expert_file(src)
    assert meta["base_fingerprint"] == smol_base.fingerprint and expert.name == "copy"
    assert dst.stat().st_mode & 0o777 == 0o644
    assert all(torch.equal(expert.z[k], original.z[k]) for k in original.z)
    store = ExpertStore(tmp_path / "store", base=smol_base)
    store.load()
    assert install_shipped(store, tmp_path / "builtin") == ["copy"]
