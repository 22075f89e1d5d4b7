"""`t2serve` flags typed from the settings: defaults and choices in --help, --x/--no-x booleans, and every bad
value one line on stderr with exit code 2, no traceback."""
from __future__ import annotations

import pytest

from server.cli import build_parser, main, settings_from_args


@pytest.mark.parametrize("argv, says", [
    (["serve", "--port", "abc"], "--port: invalid int value: 'abc'"),
    (["serve", "--dtype", "fp16"], "--dtype: invalid choice: 'fp16'"),
    (["serve", "--nope"], "unrecognized arguments: --nope"),
    (["serve", "--shipped-experts", "yes"], "unrecognized arguments: yes"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes (T2_MAX_BODY_BYTES): Input should be greater than or equal to 1"),
    (["cache", "prune", "--kind", "everything"], "--kind: invalid choice"),
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
    out = capsys.readouterr().out
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
