"""Fixtures of the GPU tests: the model folder and the native engine's reference, shared by the modules."""
from __future__ import annotations

import os

import pytest

from tests.support.gpu_ref import make_ref


@pytest.fixture(scope="session")
def folder(request) -> str:
    return os.environ.get("T2_GPU_MODEL") or str(request.getfixturevalue("smollm2_dir"))


@pytest.fixture(scope="session")
def ref(folder, tmp_path_factory):
    return make_ref(folder, tmp_path_factory.mktemp("t2cache"))
