"""`celery-ext config validate`."""

from __future__ import annotations


def test_config_validate_reports_an_unknown_strategy(tmp_path, capsys) -> None:
    from celery_ext.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("scheduler: {load_balance_strategy: weighted}\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "scheduler.load_balance_strategy: no load balancer 'weighted'" in err and "least_task" in err
