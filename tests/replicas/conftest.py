"""Fixtures of the replica tests: the expert tests' tiny model, its base-model description and settings."""
from tests.experts.conftest import base_mlp, expert_settings, tiny_model  # noqa: F401  (fixtures)
