"""Hostile expert files: safetensors whose header lies (length, offsets, shapes, dtypes), pickles that
run code when unpickled, and names that try to leave the expert folder."""
from __future__ import annotations

import builtins
import io
import json
import pickle

import torch

F32 = "F32"


def safetensors_bytes(header: dict | list | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from its parts: 8-byte little-endian header length, JSON header, data.
    ``length`` overrides the true header length (to make it lie)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def _t(shape, offsets, dtype=F32) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# name -> file; every one must be refused as not a (valid) safetensors file.
LYING_SAFETENSORS = {
    "length past the end": safetensors_bytes({"a": _t([4], [0, 16])}, bytes(16), length=10**6),
    "length 2^63": safetensors_bytes({"a": _t([4], [0, 16])}, bytes(16), length=2**63),
    "length cuts the header": safetensors_bytes({"a": _t([4], [0, 16])}, bytes(16), length=10),
    "header is a list": safetensors_bytes([1, 2]),
    "overlapping offsets": safetensors_bytes({"a": _t([4], [0, 16]), "b": _t([4], [8, 24])}, bytes(24)),
    "aliased offsets": safetensors_bytes({"a": _t([4], [0, 16]), "b": _t([4], [0, 16])}, bytes(16)),
    "offsets past the data": safetensors_bytes({"a": _t([4], [0, 10**6])}, bytes(16)),
    "reversed offsets": safetensors_bytes({"a": _t([4], [16, 0])}, bytes(16)),
    "shape larger than its bytes": safetensors_bytes({"a": _t([4], [0, 8])}, bytes(8)),
    "shape overflows": safetensors_bytes({"a": _t([2**40, 2**40], [0, 16])}, bytes(16)),
    "negative shape": safetensors_bytes({"a": _t([-1], [0, 16])}, bytes(16)),
    "unknown dtype": safetensors_bytes({"a": _t([4], [0, 16], "Q7")}, bytes(16)),
    "unreferenced bytes": safetensors_bytes({"a": _t([4], [0, 16])}, bytes(32)),
    "metadata not strings": safetensors_bytes({"__metadata__": {"x": {"y": 1}}, "a": _t([4], [0, 16])}, bytes(16)),
    "deeply nested header": safetensors_bytes(b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}"),
    "header not UTF-8": safetensors_bytes(b'{"\xff":1}'),
    "empty file": b"",
}


class RunsCode:
    """Unpickling this writes ``path``: proof that a loader executed the payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",)


def pickle_payloads(marker: str) -> dict[str, bytes]:
    """name -> bytes that run code (create ``marker``) if unpickled: every protocol, torch.save's zip,
    and a pickle behind a safetensors-looking prefix."""
    obj = {"model.layers.0.mlp.gate_proj.weight": RunsCode(marker)}
    out = {f"pickle protocol {p}": pickle.dumps(obj, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    out["torch.save zip"] = buf.getvalue()
    legacy = io.BytesIO()
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    out["torch.save legacy"] = legacy.getvalue()
    body = pickle.dumps(obj, protocol=2)
    out["pickle behind a safetensors prefix"] = len(body).to_bytes(8, "little") + b"{" + body
    return out


# Names that must never become paths: each is refused as an expert name.
TRAVERSAL_NAMES = ["..", ".", "../escape", "a/../../escape", "/etc/passwd", "..\\escape", "a\\b", ".hidden",
                   "~root", "a\x00b", "\uff0e\uff0e", "a" * 65, "", " x", "x\n"]
