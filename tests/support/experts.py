"""Small builders shared by the expert tests."""
from __future__ import annotations

import json

import torch

from experts.store.base_model import BaseModelInfo

ADMIN, USER = "admin-key", "user-key"


def random_z(base: BaseModelInfo, seed: int, scale: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: scale * torch.randn(t.rank, generator=g) for t in base.targets}


def as_lists(z: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in z.items()}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def post_json(client, name: str, z: dict, key: str | None = ADMIN, **meta):
    return client.post("/v1/experts", json={"name": name, "z": as_lists(z), **meta}, headers=auth(key))


def post_files(client, meta: dict, files: list[tuple[str, bytes]], key: str | None = ADMIN):
    """A multipart upload: the metadata part and (field, bytes) files."""
    parts = [(field, (f"{field}.bin", data, "application/octet-stream")) for field, data in files]
    return client.post("/v1/experts", data={"metadata": json.dumps(meta)}, files=parts, headers=auth(key))
