"""Celery loads celery_ext's ``celery.commands`` plugin into every ``celery`` process of the
environment: workers, ``celery call``, Flower.  What only the CLI's tables need is imported when
a table is printed, not there."""

from __future__ import annotations

import subprocess
import sys

from celery_ext.cli.common import print_table

PROBE = """
import sys
import celery_ext.cli.scheduler_cmd, celery_ext.cli
print(sorted({m.split('.')[0] for m in sys.modules} & {'rich'}))
"""


def test_the_celery_command_plugin_imports_no_table_printer() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_a_table_still_prints(capsys) -> None:  # type: ignore[no-untyped-def]
    print_table("workers", ["name", "state"], [["w1@host", "online"], ["w2@host", None]])
    out = capsys.readouterr().out
    assert "workers" in out and "w1@host" in out and "online" in out and "w2@host" in out
