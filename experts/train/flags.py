"""Command-line flags generated from a run's config dataclass (``TrainConfig``, ``SAPTConfig``): one flag
per field, so the entry points and the configs can never disagree."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def _type(annotation: str):
    return int if "int" in annotation else float if "float" in annotation else str


def add_config_flags(p: argparse.ArgumentParser, config_cls, helps: dict[str, str], skip: tuple[str, ...] = (),
                     optional: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass (``--batch-size`` for ``batch_size``); fields without a
    default are required unless named in ``optional``."""
    for f in fields(config_cls):
        if f.name in skip:
            continue
        required = f.default is MISSING and f.name not in optional
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type(str(f.type)), required=required,
                       default=None if f.default is MISSING else f.default, help=helps.get(f.name))
