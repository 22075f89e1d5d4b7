"""The mixture graph of the store: mixture experts name svf experts (their components), so a component
cannot be deleted, or replaced by something the mixture cannot use, while a mixture depends on it, and a
replaced component means re-mixing the mixtures built on it.

Functions of the store's in-memory view (name -> ``StoredExpert``); the store calls them under its lock
and publishes what they return.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from adapters.adaptation import SVFExpert
from experts.store.errors import ExpertError
from experts.store.records import ExpertRecord
from experts.store.stored import StoredExpert
from experts.store.validation import PreparedExpert, mix_components

T = TypeVar("T")


def components(prepared: PreparedExpert, experts: Mapping[str, StoredExpert]) -> list[SVFExpert]:
    """The served svf experts a mixture names, in its order; ExpertError if one is missing or not usable."""
    parts = []
    for n in prepared.draft.experts:
        s = experts.get(n)
        if s is None:
            raise ExpertError(f"mixture {prepared.draft.name!r} names unknown expert {n!r}",
                              code="expert_not_found", param="experts")
        if s.record.kind != "svf" or not s.ready:
            raise ExpertError(f"mixture {prepared.draft.name!r}: {n!r} is not a ready svf expert",
                              code="invalid_mixture", param="experts")
        parts.append(s.payload)
    return parts


def mixed(prepared: PreparedExpert, experts: Mapping[str, StoredExpert]) -> SVFExpert:
    """What a mixture serves: its weights applied to its components as they are now."""
    return mix_components(prepared, components(prepared, experts))


def dependents(name: str, experts: Mapping[str, StoredExpert]) -> list[str]:
    """The mixtures that name ``name`` as a component, sorted."""
    return sorted(s.name for s in experts.values()
                  if s.record.kind == "mixture" and name in s.record.spec.get("experts", ()))


def check_dependents(name: str, payload, experts: Mapping[str, StoredExpert]) -> None:
    """A replacement must keep the mixtures built on it valid (same matrices, parametrization)."""
    for user in dependents(name, experts):
        s = experts[user]
        if s.prepared is None:
            continue
        parts = [payload if n == name else experts[n].payload for n in s.record.spec["experts"]]
        if not isinstance(payload, SVFExpert):
            raise ExpertError(f"{name!r} is part of mixture {user!r} and must stay an svf expert",
                              code="expert_in_use", status=409, param="name")
        try:
            mix_components(s.prepared, parts)
        except ExpertError as e:
            raise ExpertError(f"replacing {name!r} would break mixture {user!r}: {e.message}",
                              code="expert_in_use", status=409, param="name") from e


def parts_first(found: Iterable[tuple[ExpertRecord, T]]) -> list[tuple[ExpertRecord, T]]:
    """Versions read from disk in publishing order: components before the mixtures that need them."""
    return sorted(found, key=lambda rt: rt[0].kind == "mixture")
