"""`t2serve` flags typed from the settings: defaults and choices in --help, --x/--no-x booleans, every bad
value one line on stderr with exit code 2 naming the flag and its T2_ variable, no traceback; and no heavy
import before the arguments are parsed, so --help and mistakes answer at once."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest

from experts.store.shipped import shipped_files
from server.cli import build_parser, main, settings_from_args
from server.config import SHIPPED, SHOWN_DEFAULTS, Settings, env_var, shown_default
from tests.support import REPO_ROOT


@pytest.mark.parametrize("argv, says", [
    (["serve", "--port", "abc"], "--port (T2_PORT): invalid int value: 'abc'"),
    (["serve", "--port", "70000"], "--port (T2_PORT): Input should be less than or equal to 65535"),
    (["serve", "--dtype", "fp16"], "--dtype (T2_DTYPE): invalid choice: 'fp16'"),
    (["serve", "--max-num-seqs"], "--max-num-seqs (T2_MAX_NUM_SEQS): expected one argument"),
    (["serve", "--shipped-experts=yes"], "--shipped-experts/--no-shipped-experts (T2_SHIPPED_EXPERTS): ignored"),
    (["experts", "list", "--expert-dir"], "--expert-dir (T2_EXPERT_DIR): expected one argument"),
    (["serve", "--nope"], "unrecognized arguments: --nope"),
    (["serve", "--shipped-experts", "yes"], "unrecognized arguments: yes"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes (T2_MAX_BODY_BYTES): Input should be greater than or equal to 1"),
    (["cache", "prune", "--kind", "everything"], "argument --kind: invalid choice"),
    (["cache", "list", "--cache-dir"], "--cache-dir (T2_CACHE_DIR): expected one argument"),
])
def test_a_bad_value_is_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as ex:
        raise SystemExit(main(argv))
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_bad_environment_value_names_its_variable(capsys, monkeypatch):
    monkeypatch.setenv("T2_PORT", "eighty")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2serve: error: --port (T2_PORT):") and len(err.splitlines()) == 1


def test_booleans_are_flags_and_help_shows_defaults_and_choices(capsys):
    p = build_parser()
    assert settings_from_args(p.parse_args(["serve", "--no-shipped-experts"])).shipped_experts is False
    assert settings_from_args(p.parse_args(["serve", "--shipped-experts"])).shipped_experts is True
    assert settings_from_args(p.parse_args(["serve", "--max-num-seqs", "7", "--cache-max-gb", "2.5"])).cache_max_gb == 2.5
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "{auto,float32,bfloat16,float16}" in out and "(default: 8000)" in out and "--no-shipped-experts" in out


def test_each_subcommand_shows_only_its_own_options(capsys):
    p = build_parser()
    for argv, absent in ((["experts", "list", "--help"], ("--port", "--max-num-seqs", "--api-key")),
                         (["prepare", "--help"], ("--port", "--expert-dir")),
                         (["cache", "list", "--help"], ("--model", "--port"))):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        out = capsys.readouterr().out
        assert not [f for f in absent if f in out], (argv, out)
    with pytest.raises(SystemExit):
        p.parse_args(["experts", "list", "--help"])
    assert "--expert-dir" in capsys.readouterr().out


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, action) of every argument of ``parser`` and its subcommands, --help aside."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_has_help_and_its_real_default():
    options = list(_options(build_parser()))
    assert len(options) > 100
    missing = [(" ".join(path), a.option_strings or a.dest) for path, a in options if not (a.help or "").strip()]
    assert not missing, missing
    for path, a in options:
        name = a.dest
        if path == ("serve",):
            assert name in Settings.model_fields and f"[env {env_var(name)}]" in a.help, a.help
        assert "(default: None)" not in a.help, (path, a.help)
        if path[0] in ("serve", "prepare", "cache", "experts") and name in Settings.model_fields:
            assert f"(default: {shown_default(name)}) [env {env_var(name)}]" in a.help, (path, a.help)
    serve = dict((a.dest, a.help) for path, a in options if path == ("serve",))
    assert set(serve) == set(Settings.model_fields)  # every setting is a flag of serve
    assert "(default: experts/ in cache_dir)" in serve["expert_dir"]
    assert "(default: ~/.cache/t2serve)" in serve["cache_dir"]


def test_shown_defaults_cover_exactly_the_unset_and_machine_dependent_settings():
    unset = {n for n, f in Settings.model_fields.items() if f.default is None}
    assert set(SHOWN_DEFAULTS) == unset | {"cache_dir"}


def test_the_shipped_experts_help_lists_the_experts_that_ship(capsys):
    assert SHIPPED == tuple(sorted(p.stem for p in shipped_files())) and len(SHIPPED) >= 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also after a hyphen
    assert f"SmolLM2's{len(SHIPPED)}:{','.join(SHIPPED)}" in out


# Runs t2serve's main in a fresh interpreter, then reports which heavy modules it had imported.
_PROBE = """import sys
from server.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "engine.factory", "server.app", "uvicorn") if m in sys.modules)
print("heavy:", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["serve", "--help"], 0),
    (["experts", "import", "--help"], 0),
    (["serve", "--port", "abc"], 2),
    (["serve", "--max-body-bytes", "0"], 2),
    (["serve", "--no-such-flag"], 2),
])
def test_help_and_mistakes_import_nothing_heavy(argv, code):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "heavy:", proc.stderr


def test_help_answers_at_once():
    # Measured about 0.2 s (torch alone takes seconds to import); the bound leaves room for a loaded machine.
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--port" in proc.stdout
    assert time.monotonic() - start < 3
