"""deploy/: every file parses; docker-compose.yml passes the Compose Specification's schema
(check-jsonschema), the Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate),
prometheus.yml passes promtool (Debian's prometheus package); every command a service runs exists
in the CLI with the options it is given; every config a service mounts validates with
``celery-ext config validate``, with the environment the service gets."""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
MOUNT = "/etc/celery_ext/config.yaml"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def example_env() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return {k: v for k, v in pairs}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # resolves << merges
    return data


def manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def ours(image: str) -> bool:
    return image.split(":")[0] == "celery-ext"


# --- every file parses --------------------------------------------------------------------


def test_every_file_in_deploy_parses() -> None:
    seen = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith((".yaml", ".yml")):
            assert list(yaml.safe_load_all(path.read_text())), path
        elif name.endswith(".service"):
            unit = configparser.ConfigParser(strict=False, interpolation=None)
            unit.optionxform = str  # type: ignore[assignment,method-assign]
            unit.read_string(path.read_text())
            assert {"Unit", "Service", "Install"} <= set(unit.sections()), path
        elif name == "Dockerfile":
            for line in logical_lines(path.read_text()):
                assert line.split()[0] in {"FROM", "COPY", "RUN", "USER", "WORKDIR", "ENV", "CMD"}, line
        elif name == ".env.example":
            assert all(
                re.fullmatch(r"[A-Z_]+=\S*", line)
                for line in path.read_text().splitlines()
                if line and not line.startswith("#")
            )
        elif name.endswith(".md"):
            pass
        else:
            pytest.fail(f"{path}: a file this test does not know how to check")
        seen.append(name)
    assert {
        "docker-compose.yml",
        "Dockerfile",
        "celery-ext-worker.service",
        "celery-ext-scheduler.service",
        "celery-ext-flower.service",
        "configmap.yaml",
        "pdb.yaml",
    } <= set(seen)


def logical_lines(text: str) -> Iterator[str]:
    line = ""
    for raw in text.splitlines():
        if raw.startswith("#") or not raw.strip():
            continue
        line += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            yield line.strip()
            line = ""


# --- the checkers ----------------------------------------------------------------------------


def test_compose_file_passes_the_compose_specification_schema() -> None:
    res = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_kubernetes_manifests_pass_the_api_schemas() -> None:
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    res = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == sum(1 for _ in manifests())


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool") or "/opt/prometheus-deb/usr/bin/promtool"
    if not Path(promtool).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (.ci/run unpacks Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get download prometheus; dpkg-deb -x)")
    res = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "compose" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# --- what the compose file and the manifests hold ------------------------------------------------


def test_compose_runs_the_whole_cluster() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "api", "flower", "prometheus", "scheduler"} <= set(services)
    workers = {name: s for name, s in services.items() if "worker" in s.get("command", [])}
    assert len(workers) == 2
    types = [s["command"][s["command"].index("--supported-types") + 1] for s in workers.values()]
    assert len(set(types)) == 2 and not set(types[0].split(",")) & set(types[1].split(","))
    assert all(s["stop_signal"] == "SIGTERM" and s["stop_grace_period"] for s in workers.values())
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert "--requirepass" in services["redis"]["command"]

    config = yaml.safe_load((DEPLOY / "compose" / "config.yaml").read_text())
    metrics = next(p for p in config["plugins"] if p["name"] == "metrics")["config"]
    assert metrics["bind"] == "0.0.0.0"
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for group in job.get("static_configs", []) for t in group["targets"]}
    assert targets == {f"{name}:{metrics['prometheus_port']}" for name in workers}
    # Every scheduler replica (the leader exports the cluster's task_created counts).
    [schedulers] = [sd for job in scrape for sd in job.get("dns_sd_configs", [])]
    assert (schedulers["names"], schedulers["port"]) == (["scheduler"], metrics["scheduler_port"])


def test_kubernetes_has_every_part_with_probes_and_grace() -> None:
    docs = manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"celery-ext-worker", "celery-ext-scheduler", "celery-ext-api", "celery-ext-flower"}
    assert {
        ("Service", "celery-ext-api"),
        ("Service", "celery-ext-flower"),
        ("ConfigMap", "celery-ext-config"),
    } <= kinds
    assert sum(1 for d in docs if d["kind"] == "PodDisruptionBudget") >= 2
    for name, d in deployments.items():
        volumes = d["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": "celery-ext-config"}} in volumes, name

    worker = deployments["celery-ext-worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60  # a SIGTERM'd worker finishes its tasks
    api = deployments["celery-ext-api"]["spec"]["template"]["spec"]["containers"][0]
    from celery_ext.api import PUBLIC_PATHS

    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= PUBLIC_PATHS  # probes need no token
    config = yaml.safe_load(configmap_config())
    port = {p["name"]: p["containerPort"] for p in api["ports"]}["http"]
    assert port == config["api"]["port"] == int(api["command"][api["command"].index("--port") + 1])
    pdb_selectors = [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert deployments["celery-ext-worker"]["spec"]["selector"]["matchLabels"] in pdb_selectors


def configmap_config() -> str:
    cm = next(d for d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "celery-ext-config")
    text: str = cm["data"]["config.yaml"]
    return text


# --- the commands they run exist, with those options -------------------------------------------


def commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for name, service in compose()["services"].items():
        if ours(service.get("image", "")):
            found.append((f"docker-compose.yml {name}", list(service["command"])))
    for doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            if ours(container["image"]):
                argv = [*container.get("command", []), *container.get("args", [])]
                # Kubernetes expands $(VAR) from the container's env before running it.
                found.append((f"kubernetes {doc['metadata']['name']}", [re.sub(r"\$\(\w+\)", "x", a) for a in argv]))
    for unit in sorted(DEPLOY.glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                found.append((unit.name, shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))))
    for line in logical_lines((DEPLOY / "Dockerfile").read_text()):
        if line.startswith("CMD "):
            found.append(("Dockerfile", yaml.safe_load(line.removeprefix("CMD "))))
    return found


@cache
def celery_help(sub: str, config: str) -> str:
    res = subprocess.run(
        [str(BIN / "celery"), "-A", "celery_ext", sub, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CELERY_EXT_CONFIG": config},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def flower_options() -> set[str]:
    import flower.options  # noqa: F401 - defines Flower's tornado options
    from tornado.options import options

    return set(options._options)


def test_every_command_exists_in_the_cli(tmp_path: Path) -> None:
    from celery.bin.celery import celery

    from celery_ext.cli import build_parser

    # `celery -A celery_ext X --help` builds the app: a broker URL keeps the embedded one unstarted.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"broker": {"url": "redis://127.0.0.1:1/0"}, "app": {"data_dir": str(tmp_path)}}))
    found = commands()
    assert len(found) >= 14
    for where, argv in found:
        prog = Path(argv[0]).name
        if prog == "celery-ext":
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit as exc:
                    assert exc.code == 0, f"{where}: {shlex.join(argv)}: {err.getvalue()}"
        elif prog == "celery":
            assert argv[1:3] == ["-A", "celery_ext"], (where, argv)
            sub = argv[3]
            assert sub in celery.commands, f"{where}: no `celery {sub}`"
            options = {a.split("=", 1)[0] for a in argv[4:] if a.startswith("--")}
            if sub == "flower":
                missing = {o for o in options if o[2:].replace("_", "-") not in flower_options()}
            else:
                text = celery_help(sub, str(config))
                missing = {o for o in options if not re.search(rf"(^|[\s,]){re.escape(o)}\b", text)}
            assert not missing, f"{where}: `celery {sub}` has no {sorted(missing)}"
        else:
            pytest.fail(f"{where}: runs {prog}, which is not celery or celery-ext")
    for where, argv in found:
        if "flower" in argv:
            assert "basic-auth" in flower_options()  # what FLOWER_BASIC_AUTH sets


# --- the configs they mount validate --------------------------------------------------------------


def validate(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "celery-ext"), "config", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], **env},
    )


def required_vars(text: str) -> set[str]:
    return {m.group(1) for m in ENV_REF.finditer(text) if not m.group(2)}


def test_every_mounted_config_validates(tmp_path: Path) -> None:
    env = example_env()
    checked = []
    # docker compose: each service's own environment must supply what its config needs.
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source, _, target = volume.partition(":")
            if not target.startswith(MOUNT):
                continue
            path = (DEPLOY / source).resolve()
            given = {
                k: ENV_REF.sub(lambda m: env.get(m.group(1), "x"), str(v))
                for k, v in service.get("environment", {}).items()
            }
            assert required_vars(path.read_text()) <= set(given), (name, sorted(required_vars(path.read_text())))
            res = validate(path, given)
            assert res.returncode == 0, f"{name}: {res.stderr}"
            checked.append(name)
    assert len(checked) >= 6
    # Kubernetes: the ConfigMap's config.yaml, with the Secret's keys.
    text = configmap_config()
    config = tmp_path / "config.yaml"
    config.write_text(text)
    secret_keys = {"DB_PASSWORD", "REDIS_PASSWORD", "API_TOKEN"}
    assert required_vars(text) <= secret_keys
    documented = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    assert all(f"--from-literal={key}=" in documented for key in secret_keys)
    res = validate(config, {k: "x" for k in secret_keys})
    assert res.returncode == 0, res.stderr
    # systemd: the units read /etc/celery_ext/config.yaml, which deploy/README.md says is config.production.yaml.
    assert all(f"CELERY_EXT_CONFIG={MOUNT}" in unit.read_text() for unit in DEPLOY.glob("*.service"))
    production = DEPLOY / "config.production.yaml"
    res = validate(production, {k: "x" for k in required_vars(production.read_text())})
    assert res.returncode == 0, res.stderr
