"""Runs inside vLLM's workers (named as vLLM's ``worker_extension_cls``): the per-row adaptation's RPCs.

Importing this module in a worker installs the rows hooks in vLLM's model runner (``engine.vllm.rows_worker``),
before the runner exists (vLLM imports the extension class first); a runner whose config carries no rows
configuration stays vLLM's own.
"""
from __future__ import annotations

import importlib.util

import torch

from engine.vllm.rows_worker import install_runner_hooks, rows_of


class RowsExtension:
    """Methods vLLM adds to its workers, called through ``collective_rpc``."""

    def t2_rows_info(self) -> dict:
        return rows_of(self).info()

    def t2_rows_sigma(self) -> dict[str, torch.Tensor]:
        return rows_of(self).sigma()

    def t2_rows_put_expert(self, digest: str, path: str, parametrization: str) -> None:
        rows_of(self).put_expert(digest, path, parametrization)

    def t2_rows_drop_expert(self, digest: str) -> None:
        rows_of(self).tables.drop_expert(digest)

    def t2_rows_put_bundle(self, key: str, path: str, rank: int, offset: int) -> int:
        return rows_of(self).put_bundle(key, path, rank, offset)

    def t2_rows_drop_bundle(self, key: str) -> None:
        rows_of(self).drop_bundle(key)


if importlib.util.find_spec("vllm") is not None:  # without vLLM there is no runner to hook (CPU tests)
    install_runner_hooks()
