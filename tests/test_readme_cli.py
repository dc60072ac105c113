"""The README's command table and the `multitower` parser agree (issue 15, part 4): every command
and flag the table shows exists, and every command of the parser (every `bench` target too) has
a row."""

import argparse
import re

from multitower_jax import cli
from tests.conftest import REPO


def _table_commands() -> list[str]:
    """The `multitower ...` invocations in the first cells of the README's command table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Commands\n"):]
    section = section[: section.index("\n## ", 1)]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `multitower")]
    return [c for cell in cells for c in re.findall(r"`(multitower [^`]*)`", cell)]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _shown(invocation: str) -> tuple[str, str | None, list[str]]:
    """(command, bench target or None, flags) of one table invocation."""
    words = invocation.split()
    command = words[1]
    target = words[2] if command == "bench" else None
    flags = re.findall(r"(?<![\w.-])(--[a-z][a-z0-9-]*)(?![\w.])", invocation)
    return command, target, flags


def test_every_command_and_flag_in_the_readme_table_exists():
    parsers = _subparsers()
    invocations = _table_commands()
    assert len(invocations) > 15
    problems = []
    for invocation in invocations:
        command, target, flags = _shown(invocation)
        if command not in parsers:
            problems.append(f"{invocation}: no command {command!r}")
            continue
        options = parsers[command]._option_string_actions
        problems += [f"{invocation}: `multitower {command}` has no {flag}" for flag in flags if flag not in options]
        if command == "bench" and target not in cli.BENCHES:
            problems.append(f"{invocation}: no bench {target!r}")
    assert not problems, "\n".join(problems)


def test_every_parser_command_has_a_row():
    shown = {_shown(i)[:2] for i in _table_commands()}
    missing = [name for name in _subparsers() if name != "bench" and (name, None) not in shown]
    missing += [f"bench {what}" for what in cli.BENCHES if ("bench", what) not in shown]
    assert not missing, f"commands without a row in the README's table: {missing}"


def test_the_parsers_own_description_does_not_promise_config_everywhere():
    """The issue's drift: "every command takes --config FILE", yet `evaluate --config` is rejected."""
    parsers = _subparsers()
    without = sorted(name for name, p in parsers.items() if "--config" not in p._option_string_actions)
    assert "evaluate" in without
    text = (REPO / "README.md").read_text()
    assert "every command takes `--config FILE`" not in text
    assert "Every command takes --config FILE" not in cli._parser().description


def _distributed_flags() -> set[str]:
    p = argparse.ArgumentParser()
    cli.distributed.add_flags(p)
    return set(p._option_string_actions) - {"-h", "--help"}


def test_every_flag_of_the_parser_is_in_the_table():
    """The issue's drift: the table missed `export --step`, `index --workdir`, `export-scorer --platforms`.
    (The multi-host flags shared by train / evaluate / calibrate are documented in their own section.)"""
    shown: dict[str, set[str]] = {}
    for invocation in _table_commands():
        command, _, flags = _shown(invocation)
        shown.setdefault(command, set()).update(flags)
    skip = {"-h", "--help"} | _distributed_flags()
    missing = [f"{name} {flag}" for name, p in _subparsers().items()
               for flag in p._option_string_actions if flag.startswith("--") and flag not in skip
               and flag not in shown.get(name, set())]
    assert not missing, f"flags missing from the README's table: {missing}"


def test_the_own_logs_config_example_loads_and_maps_its_columns():
    """The issue's drift: the README's `columns` example (`user.age_bucket`) could not be written in a
    config file. The section's example is run on the base config and read back as ingest reads it."""
    from experiments import base
    from multitower_jax import config as config_lib
    from multitower_jax.data import logs

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Your own logs"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = base.get_config()
    exec(example, {"config": config})  # noqa: S102 -- the README's own example
    config_lib.validate(config)
    assert logs._flatten(config.data.logs.columns) == {
        "click": "clicked", "bid": "price", "user.age_bucket": "age", "context.query": "search_terms"}
