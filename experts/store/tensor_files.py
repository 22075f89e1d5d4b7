"""Bytes <-> tensors for expert files, without ever running code from the bytes.

- ``sniff``: what a file is, from its first bytes (safetensors, a pickle, a torch zip checkpoint).
- ``read_safetensors``: parse an uploaded safetensors file (the library checks the header, offsets and
  sizes); anything else, a pickle above all, is refused with a message that says what it was.
- ``load_reference_checkpoint``: the one place a pickle is opened: the documented reference formats,
  with ``torch.load(weights_only=True)`` (tensors and plain containers only; no arbitrary globals).
- ``check_floats``: dtype and NaN/Inf checks that name the offending tensor.
Stored files are always re-serialised by ``to_safetensors`` (never the uploaded bytes), so no foreign
header metadata reaches the disk.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from experts.store.errors import ExpertError, bad_tensors

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PICKLE_MESSAGE = ("{what} is a Python pickle{detail}; expert files must be safetensors. Pickles can run code "
                   "when loaded, so this server never unpickles uploaded bytes (reference checkpoints go "
                   "through the import formats).")


def sniff(data: bytes) -> str:
    """'safetensors', 'torch-zip', 'pickle' or 'unknown'."""
    if len(data) >= 10:
        n = int.from_bytes(data[:8], "little")
        if 2 <= n <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    if data[:4] == b"PK\x03\x04":
        return "torch-zip"  # torch.save's default format: a zip holding data.pkl
    if _is_pickle(data):
        return "pickle"
    return "unknown"


def _is_pickle(data: bytes) -> bool:
    if data[:1] == b"\x80" and len(data) > 1 and data[1] <= 5:
        return True  # PROTO opcode: protocol 2+ pickles and legacy torch.save files
    # Protocol 0/1 pickles have no header: parse (never execute) the opcode stream.
    try:
        ops = list(pickletools.genops(io.BytesIO(data[:1 << 20])))
    except Exception:
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def read_safetensors(data: bytes, what: str = "the uploaded file") -> dict[str, torch.Tensor]:
    kind = sniff(data)
    if kind in ("pickle", "torch-zip"):
        detail = " (a torch.save checkpoint)" if kind == "torch-zip" else ""
        raise ExpertError(_PICKLE_MESSAGE.format(what=what.capitalize(), detail=detail),
                          code="pickle_not_allowed", param="tensors")
    if kind != "safetensors":
        raise bad_tensors(f"{what.capitalize()} is not a safetensors file (bad header).", code="invalid_safetensors")
    try:
        return st_load(bytes(data))
    except Exception as e:  # SafetensorError: lying header length, overlapping offsets, bad dtype, ...
        raise bad_tensors(f"{what.capitalize()} is not a valid safetensors file: {e}",
                          code="invalid_safetensors") from e


def to_safetensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def check_floats(tensors: Mapping[str, torch.Tensor], what: str = "tensor") -> dict[str, torch.Tensor]:
    """Every tensor floating point and finite; returns them as float32 (the stored dtype)."""
    out = {}
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise bad_tensors(f"{what} {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; expected a "
                              "floating point dtype (float32, bfloat16, float16 or float64).", code="invalid_dtype")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise bad_tensors(f"{what} {name!r} has {bad} NaN or infinite value(s).", code="non_finite")
        out[name] = t.to(torch.float32).contiguous()
    return out


def check_unpacked_size(data: bytes, what: str, limit: int) -> None:
    """Refuse a zip archive (the format of ``torch.save`` files) whose members unpack to more than ``limit``
    bytes, before anything reads them: a few compressed bytes can otherwise expand to gigabytes. The sizes
    come from the central directory; a member whose local header claims otherwise fails to read later."""
    if not data.startswith(b"PK"):
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise bad_tensors(f"{what} is not a readable archive: {e}", code="invalid_archive") from e
    if total > limit:
        raise ExpertError(f"{what} unpacks to {total} bytes; the limit is {limit} bytes (T2_MAX_EXPERT_BYTES).",
                          code="expert_too_large", status=413, param="tensors")


def load_reference_checkpoint(data: bytes, what: str) -> Any:
    """A reference-code ``.pt`` file (tensors in plain containers), via the restricted unpickler."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, and anything malformed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExpertError(f"{what} could not be loaded as a tensors-only checkpoint (weights_only): {first[:300]}",
                          code="unsafe_or_invalid_checkpoint", param="tensors") from e


def tensor_dict(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """``obj`` as {str: Tensor}, or an error naming what it was instead."""
    if not isinstance(obj, Mapping):
        raise bad_tensors(f"{what} holds a {type(obj).__name__}, expected a dict of tensors.")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise bad_tensors(f"{what}: entry {k!r} is a {type(v).__name__}, expected a tensor under a string key.")
        out[k] = v
    return out
