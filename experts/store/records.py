"""The metadata record of a stored expert version, and the rules for names and categories.

One JSON file per version sits next to its tensor file; it is written last, so its presence is the
commit point of that version (see ``store.py``). Records are parsed strictly: a record that is not
exactly what this module writes is reported as malformed instead of half-trusted.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from experts.store.errors import ExpertError, bad_metadata

FORMAT = "t2serve-expert/1"
KINDS = ("svf", "mixture", "sapt")
# Where tensors came from: upload, an importer's format, training, or a producer with a detail after ':'
# (e.g. few_shot:<digest of its inputs>, which lets a producer recognise its own earlier result).
SOURCE_RE = re.compile(r"[a-z_]{1,32}(:[A-Za-z0-9._-]{1,128})?")

# A name is a folder name on disk and the `model` of requests: a conservative alphabet, no leading
# dot (temporary and trash entries start with one), no separators, so it cannot escape the store.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_NAME_LEN = 64
# Categories are what pass 1 dispatches on (math, code, reasoning, classifier, other, ...).
CATEGORY_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_DESCRIPTION = 1000


def check_name(name: Any, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ExpertError(
            f"Invalid expert name {shown}: use 1-{MAX_NAME_LEN} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'.", code="invalid_name", param=param)
    return name


def check_category(category: Any) -> str | None:
    if category is None:
        return None
    if not isinstance(category, str) or not CATEGORY_RE.fullmatch(category):
        raise bad_metadata(f"Invalid category {category!r}: lower-case letters, digits, '_' or '-' "
                           "(at most 32), e.g. math, code, reasoning, classifier, other.", param="category")
    return category


@dataclass(frozen=True)
class ExpertRecord:
    name: str
    kind: str  # svf | mixture | sapt
    version: int  # 1, 2, ... per name; a replacement is a new version
    created: int  # Unix seconds of this version
    sha256: str  # of the tensor file's bytes
    size: int  # bytes of the tensor file
    category: str | None = None  # what pass 1 dispatches on
    description: str = ""
    parametrization: str | None = None  # SVF composition of svf / mixture experts: sakana | direct
    targets: tuple[str, ...] = ()  # adapted matrices, in the model's module order
    base_fingerprint: str | None = None  # experts.store.base_model.model_fingerprint of the base weights
    base_model: str | None = None  # served name of that model when it was stored (informational)
    spec: Mapping[str, Any] = field(default_factory=dict)  # mixture: experts, alpha_targets; sapt: shapes
    source: str = "upload"  # where the tensors came from (SOURCE_RE)

    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self)}
        data["targets"] = list(self.targets)
        data["spec"] = dict(self.spec)
        return json.dumps(data, indent=1, sort_keys=True)

    def summary(self) -> dict[str, Any]:
        """What the registry keeps next to the tensors (pass 1 reads ``category``)."""
        return {"kind": self.kind, "category": self.category, "version": self.version, "created": self.created,
                "sha256": self.sha256, "parametrization": self.parametrization, "source": self.source}

    @classmethod
    def from_json(cls, text: str | bytes) -> "ExpertRecord":
        """Parse a stored record; any deviation raises ExpertError(invalid_metadata)."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_metadata(f"metadata record is not JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad_metadata(f"metadata record is not a {FORMAT} object")
        known = set(cls.__dataclass_fields__)
        extra = set(data) - known - {"format"}
        if extra:
            raise bad_metadata(f"metadata record has unknown fields: {sorted(extra)}")
        try:
            rec = cls(**{k: v for k, v in data.items() if k != "format"})
        except TypeError as e:
            raise bad_metadata(f"metadata record is incomplete: {e}") from e
        rec = cls(**{**asdict(rec), "targets": tuple(rec.targets or ()), "spec": dict(rec.spec or {})})
        rec.check()
        return rec

    def check(self) -> None:
        check_name(self.name)
        check_category(self.category)
        if self.kind not in KINDS:
            raise bad_metadata(f"kind {self.kind!r} is not one of {KINDS}", param="kind")
        if not isinstance(self.source, str) or not SOURCE_RE.fullmatch(self.source):
            raise bad_metadata(f"source {self.source!r} is not a source tag like 'upload' or 'few_shot:<id>'",
                               param="source")
        ints = {"version": self.version, "created": self.created, "size": self.size}
        for key, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad_metadata(f"{key} must be a non-negative integer", param=key)
        if not (isinstance(self.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.sha256)):
            raise bad_metadata("sha256 must be 64 hex digits", param="sha256")
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION:
            raise bad_metadata(f"description must be a string of at most {MAX_DESCRIPTION} characters",
                               param="description")
        if not all(isinstance(t, str) for t in self.targets):
            raise bad_metadata("targets must be module names", param="targets")
        if not isinstance(self.spec, Mapping):
            raise bad_metadata("spec must be an object", param="spec")
