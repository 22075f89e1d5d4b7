"""Make ``import adapters`` find the package, not this folder.

pytest puts ``tests/`` on sys.path (for tests/conftest.py); there ``adapters`` is a plain directory,
which Python takes as a namespace package ahead of the editable install's finder. Putting the
repository root first fixes it (``pythonpath = ["."]`` in pyproject's pytest options would fix it for
every test folder at once).
"""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("adapters"), "__file__", "set") is None:  # a namespace package got in first
    del sys.modules["adapters"]
