"""`digit-server`'s command line: setting names, flag problems, --version, --help."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from click.testing import CliRunner

from digit_recognizer.server.cli import (
    deprecated_env_vars,
    known_env_vars,
    main,
    unknown_env_vars,
)

from processes import DIGIT_SERVER


def _flag_name(option) -> str:
    return next(d for d in option.opts if d.startswith("--")).removeprefix("--")


def test_every_flag_is_read_from_digits_and_its_own_name():
    """click's auto_envvar_prefix named variables after the parameter (--grace-period:
    DIGITS_GRACE_S), so DIGITS_GRACE_PERIOD, as compose and Kubernetes set it, was ignored."""
    options = [p for p in main.params if p.name and p.envvar and p.name != "version"]
    assert len(options) >= 30
    for option in options:
        assert option.envvar == "DIGITS_" + _flag_name(option).replace("-", "_").upper()
    assert {"DIGITS_GRACE_PERIOD", "DIGITS_DRAIN_DELAY", "DIGITS_RELOAD_INTERVAL"} <= (
        known_env_vars()
    )
    assert known_env_vars() == {option.envvar for option in options}
    assert deprecated_env_vars() == {
        "DIGITS_GRACE_S": "DIGITS_GRACE_PERIOD",
        "DIGITS_DRAIN_DELAY_S": "DIGITS_DRAIN_DELAY",
        "DIGITS_RELOAD_INTERVAL_S": "DIGITS_RELOAD_INTERVAL",
    }


def test_unknown_settings_are_named_with_the_closest_known_one():
    environ = {
        "DIGITS_GRACE": "5",  # a typo'd name
        "DIGITS_WORKRS": "2",
        "DIGITS_SOMETHING_ELSE": "1",
        "DIGITS_GRACE_S": "5",  # deprecated, still known: warned about separately
        "DIGITS_TARGET": "localhost:50051",  # digit-client's, in the same shell
        "DIGITS_PORT": "6000",
        "PATH": "/bin",
    }
    assert unknown_env_vars(environ) == [
        "DIGITS_GRACE (did you mean DIGITS_GRACE_PERIOD?)",
        "DIGITS_SOMETHING_ELSE",
        "DIGITS_WORKRS (did you mean DIGITS_WORKERS?)",
    ]


def test_settings_from_the_environment_take_effect_and_odd_ones_are_named(
    processes, tiny_model_path, monkeypatch
):
    """DIGITS_GRACE_PERIOD and DIGITS_DRAIN_DELAY (compose, Kubernetes) reach the drain; the
    old DIGITS_*_S names still work with a warning naming the new one; the other DIGITS_*
    variables the server does not know are listed in ONE warning."""
    monkeypatch.setenv("DIGITS_GRACE_PERIOD", "7")
    monkeypatch.setenv("DIGITS_DRAIN_DELAY_S", "0.25")
    monkeypatch.setenv("DIGITS_RELOAD_INTERVL", "1")
    monkeypatch.setenv("DIGITS_BOGUS", "1")
    monkeypatch.setenv("DIGITS_TARGET", "localhost:1")
    server = processes("--model", str(tiny_model_path))
    server.wait_serving()
    server.proc.send_signal(signal.SIGTERM)
    code, log = server.finish()
    assert code == 0, log
    assert " draining grace_s=7.0 drain_delay_s=0.25 " in log, log
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert "DIGITS_DRAIN_DELAY_S is a deprecated name: use DIGITS_DRAIN_DELAY" in warnings[0]
    assert warnings[1].endswith(
        "unknown settings, ignored: DIGITS_BOGUS; "
        "DIGITS_RELOAD_INTERVL (did you mean DIGITS_RELOAD_INTERVAL?)"
    )


def test_the_new_name_wins_over_the_deprecated_one(monkeypatch):
    monkeypatch.setenv("DIGITS_GRACE_PERIOD", "3")
    monkeypatch.setenv("DIGITS_GRACE_S", "9")
    context = main.make_context("digit-server", [])
    assert context.params["grace_s"] == 3.0
    assert "digits_deprecated_envvars" not in context.meta


def _server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DIGIT_SERVER, "--port", "0", "--no-metrics", "--workers", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_flag_problem_is_one_line_exit_2_listed_together(tiny_model_path, tmp_path):
    """--version-policy newest used to escape validation (it was parsed only for
    --model-repository) and end in a traceback, exit 1."""
    result = _server(
        *("--model", str(tiny_model_path), "--plaintext", "--version-policy", "newest"),
        *("--max-batch-size", "0", "--model-repository", str(tmp_path)),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    problems = result.stderr.split("Error: ", 1)[1].splitlines()
    assert problems[:2] == [
        "give --model or --model-repository, not both",
        "--max-batch-size must be at least 1, got 0",
    ]
    assert len(problems) == 3, problems
    assert problems[2].startswith("--version-policy 'newest' is not a version policy: use ")
    alone = _server("--model", str(tiny_model_path), "--plaintext", "--version-policy", "newest")
    assert alone.returncode == 2 and "--version-policy 'newest'" in alone.stderr
    assert "Traceback" not in alone.stderr


def test_version_names_the_package_and_the_serving_libraries():
    import importlib.metadata

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    line = result.output.strip()
    assert re.fullmatch(
        r"digit-server \S+ \(onnxruntime \S+, grpcio \S+, Python \d+\.\d+\.\d+\S*\)", line
    ), line
    assert f"digit-server {importlib.metadata.version('digit-recognizer')} " in line
    assert f"grpcio {importlib.metadata.version('grpcio')}," in line


def test_help_shows_measured_figures_and_consistent_choices():
    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "~5.6e-4 measured on an H100" in text and "~1e-3" not in text
    assert "--log-level [debug|info|warning|error]" in text
    assert "default: info]" in text and "default: INFO" not in text
    assert "[env var: DIGITS_GRACE_PERIOD; default: 20.0]" in text
    assert "--http-plaintext" in text and "in clear" in text
    assert "--version" in text


@pytest.mark.parametrize("level", ["INFO", "debug"])
def test_log_levels_are_taken_in_either_case(tiny_model_path, level):
    result = _server("--model", str(tiny_model_path), "--log-level", level, "--workers", "0")
    assert result.returncode == 2 and "--workers must be at least 1" in result.stderr
    assert "log-level" not in result.stderr
