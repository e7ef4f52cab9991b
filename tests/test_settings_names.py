"""One set of setting names everywhere: every DIGITS_* variable and every --flag that the deploy
files and the docs hand to our commands is one the command really reads. A name the server
ignores is worse than an error: the deploy file looks right and its setting never applies."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("digit-server", "digit-client", "digit-train", "digit-probe")
# Read by the test suite's opt-in soak test, not by a command.
TEST_ONLY = {"DIGITS_SOAK", "DIGITS_SOAK_SECONDS"}


def sources() -> list[Path]:
    files = [REPO / "README.md", REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml"]
    files += [REPO / "Dockerfile", REPO / "Makefile"]
    return files + sorted((REPO / "deploy").rglob("*.yaml")) + sorted((REPO / "docs").glob("*.md"))


def command(program: str) -> click.Command:
    (point,) = entry_points(group="console_scripts", name=program)
    return point.load()


def contexts(cmd: click.Command, parent: click.Context | None = None) -> Iterator[click.Context]:
    """A context for the command and each subcommand, as click builds them when run."""
    ctx = click.Context(cmd, info_name=cmd.name, parent=parent, **cmd.context_settings)
    yield ctx
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            yield from contexts(sub, ctx)


def accepted(program: str) -> tuple[set[str], set[str]]:
    """(variables, flags) the program reads, from its click definition."""
    if program == "digit-probe":  # argparse, stdlib only: it must stay cheap
        from digit_recognizer.client.probe import build_parser

        return set(), {o for a in build_parser()._actions for o in a.option_strings}
    variables: set[str] = set()
    flags: set[str] = set()
    for ctx in contexts(command(program)):
        for param in ctx.command.params:
            if not isinstance(param, click.Option):
                continue
            flags.update(o for o in param.opts + param.secondary_opts if o.startswith("--"))
            if param.envvar:
                names = [param.envvar] if isinstance(param.envvar, str) else param.envvar
                variables.update(names)
            # click reads the automatic name too, unless the option opts out.
            if ctx.auto_envvar_prefix and param.allow_from_autoenv and param.name:
                variables.add(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return variables, flags


def mentioned_variables(text: str) -> set[str]:
    return set(re.findall(r"\bDIGITS_[A-Z0-9_]*[A-Z0-9]\b", text))


def mentioned_flags(text: str, program: str) -> set[str]:
    """--flags on lines that run `program` (a YAML args list counts as its image's command)."""
    found = set()
    for line in text.splitlines():
        if re.search(rf"(^|[\s`\"'/(]){program}\b", line):
            after = line.split(program, 1)[1]
            found.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w-])", after))
    return found


def test_every_digits_variable_written_anywhere_is_read_by_a_command():
    from digit_recognizer.server.cli import deprecated_env_vars

    known = set(TEST_ONLY) | set(deprecated_env_vars())  # still read, with a warning
    for program in ("digit-server", "digit-client", "digit-train"):
        known |= accepted(program)[0]
    unknown = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sources()
        for name in mentioned_variables(path.read_text())
        if name not in known
    }
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_flag_written_anywhere_is_one_the_command_has(program):
    flags = accepted(program)[1] | {"--help", "--version"}
    unknown = {
        f"{path.relative_to(REPO)}: {program} {flag}"
        for path in sources()
        for flag in mentioned_flags(path.read_text(), program)
        if flag not in flags
    }
    assert not unknown, sorted(unknown)


def test_deploy_args_are_server_and_trainer_flags():
    import yaml

    server_flags = accepted("digit-server")[1]
    train_flags = accepted("digit-train")[1]
    for path in sorted((REPO / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                flags = {a for a in container.get("args", []) if a.startswith("--")}
                wanted = train_flags if "trainer" in container["image"] else server_flags
                assert flags <= wanted, f"{path.name}: {sorted(flags - wanted)}"


def test_the_check_catches_a_misspelt_variable():
    known = accepted("digit-server")[0]
    assert "DIGITS_PORT" in known
    # The names the deploy files used while the server read DIGITS_GRACE_S: now both work.
    assert {"DIGITS_GRACE_PERIOD", "DIGITS_DRAIN_DELAY"} <= known
    assert "DIGITS_GRACE_PERIODS" not in known


def test_every_server_flag_is_in_the_flag_table():
    table = (REPO / "docs" / "server.md").read_text()
    missing = [
        param.opts[0]
        for param in command("digit-server").params
        if isinstance(param, click.Option) and f"`{param.opts[0]}" not in table
    ]
    assert not missing, missing
