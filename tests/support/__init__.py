"""Helpers shared by the tests (imported as ``tests.support.<module>``; tests never import each other)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: servers started by tests run from here
