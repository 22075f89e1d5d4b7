"""The ``train`` command: ``t2serve train svf|classifier|sapt`` and ``python -m experts.train svf|classifier|sapt``.

It joins the kinds of two subpackages, SVF experts and the classifier (``experts.train.cli``) and SAPT bundles
(``experts.sapt.cli``, built on ``experts.train``), so it sits above both. Imports nothing from the server.
"""
from __future__ import annotations

import argparse
import sys

from experts.sapt.cli import add_sapt_parser
from experts.tasks.base import DataMissingError
from experts.train.cli import add_kinds


def _add_kinds(kinds) -> None:
    add_kinds(kinds)
    add_sapt_parser(kinds)


def add_train_subcommand(sub) -> None:
    """Register ``train`` (with ``svf``, ``classifier`` and ``sapt``) on a subparsers object."""
    train = sub.add_parser("train", help="train an SVF expert (REINFORCE or next-token), the classifier expert, "
                           "or a SAPT bundle (continual learning)")
    _add_kinds(train.add_subparsers(dest="kind", required=True))


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experts.train",
                                description="Train Transformer² SVF experts and SAPT bundles")
    _add_kinds(p.add_subparsers(dest="kind", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except DataMissingError as e:  # one line saying which file is expected where, no traceback
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
