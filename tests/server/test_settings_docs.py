"""docs/settings.md is generated from ``Settings`` (``python -m server.config --markdown``): the committed page
must equal what the code generates now, so a setting added, renamed or given another default or choice
cannot leave the documentation behind."""
from __future__ import annotations

import subprocess
import sys

from server.config import Settings, env_var, flag, settings_markdown, shown_default
from tests.support import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "settings.md"


def test_the_settings_page_equals_the_settings():
    assert PAGE.read_text() == settings_markdown(), "regenerate: python -m server.config --markdown > docs/settings.md"


def test_the_page_has_one_row_per_setting_with_its_variable_flag_default_and_choices():
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in settings_markdown().splitlines()
            if line.startswith("| ") and "`T2_" in line}
    assert list(rows) == list(Settings.model_fields)
    assert rows["port"][1:4] == [f"`{env_var('port')}`", f"`{flag('port')}`", "8000"]
    assert rows["dtype"][4] == "auto, float32, bfloat16, float16"
    assert rows["shipped_experts"][2] == "`--shipped-experts` / `--no-shipped-experts`"
    assert rows["expert_dir"][3] == shown_default("expert_dir") != "None"
    assert rows["shutdown_timeout"][3] == str(Settings.model_fields["shutdown_timeout"].default)


def test_the_generator_runs_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "server.config", "--markdown"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == settings_markdown()
