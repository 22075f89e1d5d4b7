"""vLLM with tensor parallelism 2 against one GPU (skipped without 2 GPUs and vLLM): ``bench/tp_check.py``
on a 4-layer model with Llama-3-8B's layer shapes; the full 32 layers are `bash bench/lab/gpu_multi.sh`'s."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import REPO_ROOT

ROOT = REPO_ROOT
pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("vllm") and torch.cuda.device_count() >= 2),
                                reason="needs 2 GPUs and vLLM")


def test_two_gpus_give_the_one_gpu_greedy_tokens_for_mixed_adaptations(tmp_path, request):
    tokenizer = os.environ.get("T2_GPU_MODEL") or str(request.getfixturevalue("smollm2_dir"))
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tp_check.py"), "--tp", "2", "--layers", "4",
                           "--tokenizer", tokenizer, "--work", str(tmp_path / "work"),
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], cwd=ROOT, timeout=1500)
    result = json.loads(out.read_text())
    assert result["workers"] == 2, result
    assert result["max_gap"] <= 1.0, result
    assert proc.returncode == 0
