"""Command-line flags generated from a run's config dataclass (``TrainConfig``, ``SAPTConfig``): one flag
per field, so the entry points and the configs can never disagree."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def _type(annotation: str):
    return int if "int" in annotation else float if "float" in annotation else str


# Fields every run config has, described once.
COMMON_HELP = {
    "seed": "random seed (data order, sampling, initialisation)",
    "device": "auto (the GPU if one is visible) | cpu | cuda | cuda:N",
    "dtype": "auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16",
    "threads": "torch intra-op threads on CPU (default: torch's choice)",
    "cache_dir": "converted models and SVD factors (default: the server's, ~/.cache/t2serve)",
}
LOG_LEVEL_HELP = "least severe log lines written: critical | error | warning | info | debug"


def add_config_flags(p: argparse.ArgumentParser, config_cls, helps: dict[str, str], skip: tuple[str, ...] = (),
                     optional: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass (``--batch-size`` for ``batch_size``); fields without a
    default are required unless named in ``optional``."""
    for f in fields(config_cls):
        if f.name in skip:
            continue
        required = f.default is MISSING and f.name not in optional
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type(str(f.type)), required=required,
                       default=None if f.default is MISSING else f.default,
                       help=_with_default(helps.get(f.name) or COMMON_HELP.get(f.name, ""), f.default))


def _with_default(text: str, default) -> str:
    """``text`` with the default appended, unless unset or already said ("%" escaped for argparse)."""
    if default not in (MISSING, None, "") and "default" not in text:
        text += f" (default: {default})"
    return text.replace("%", "%%")
