"""Celery loads celery_ext's ``celery.commands`` plugin into every ``celery`` process of the
environment: workers, ``celery call``, Flower.  What only the ``celery-ext`` command line needs
(its command modules, and the table printer) is imported when that is used, not there."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from celery_ext.cli.common import print_table

# What Celery's CLI does at start: load every ``celery.commands`` entry point of the environment.
PROBE = """
import sys
from importlib.metadata import entry_points
loaded = [ep.load() for ep in entry_points(group="celery.commands") if ep.value.startswith("celery_ext.")]
assert loaded, "celery_ext's celery.commands plugin is not installed"
import celery_ext.cli
print(sorted({m.split('.')[0] for m in sys.modules} & {'rich'}))
print(sorted(m for m in sys.modules if m.endswith('_cmd') or m == 'celery_ext.embedded'))
"""


def test_the_celery_command_plugin_imports_no_table_printer() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rich, commands = done.stdout.splitlines()
    assert rich == "[]", done.stdout
    assert commands == "['celery_ext.cli.scheduler_cmd']", done.stdout


def test_the_command_line_still_has_every_command() -> None:
    from celery_ext.cli import MODULES, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"submit", "get", "list", "logs", "workers", "config", "storage", "schedules", "api", "embedded"} <= set(
        commands
    ), sorted(commands)
    assert all(f"celery_ext.cli.{name}" in sys.modules for name in MODULES)


def test_a_table_still_prints(capsys: pytest.CaptureFixture[str]) -> None:
    print_table("workers", ["name", "state"], [["w1@host", "online"], ["w2@host", None]])
    out = capsys.readouterr().out
    assert "workers" in out and "w1@host" in out and "online" in out and "w2@host" in out
