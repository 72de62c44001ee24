"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine here).

What a broken stack would get wrong: a service missing or on the wrong image,
Kafka not in KRaft mode, a process pointed at the wrong broker or lake, a
volume not shared, a health check missing, a ``depends_on`` on nothing, and -
the most likely drift - a ``command`` that is not (or no longer) a real
``lambdalake`` or ``airflow`` sub-command with real flags.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from lambdalake.cli import app as cli_app
from lambdalake.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
LAMBDALAKE_SERVICES = ("speed-0", "speed-1", "serve")
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor")
# LAMBDALAKE_* variables that are not settings fields (read by lambdalake.logs).
LOG_VARIABLES = {"LAMBDALAKE_LOG_FORMAT", "LAMBDALAKE_LOG_LEVEL"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _invocations(service: dict[str, Any], program: str) -> list[list[str]]:
    """Every ``program ...`` call of a service: its command, or the lines of a ``bash -c`` script."""
    argv = _command(service)
    if argv[:2] == ["bash", "-c"]:
        return [
            shlex.split(line)
            for line in argv[2].splitlines()
            if line.strip().startswith(program + " ")
        ]
    return [argv] if argv and argv[0] == program else []


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> volume name."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_the_stack_has_every_service_on_the_right_image(services: dict[str, Any]) -> None:
    assert set(services) == {
        "kafka",
        "postgres",
        "airflow-init",
        *AIRFLOW_SERVICES,
        *LAMBDALAKE_SERVICES,
    }
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    ours = {"airflow-init", *AIRFLOW_SERVICES, *LAMBDALAKE_SERVICES}
    for name in ours:
        assert services[name]["image"] == "lambdalake:local", name
        assert services[name]["build"]["dockerfile"] == "Dockerfile", name
    assert not any("zookeeper" in json.dumps(s).lower() for s in services.values())


def test_kafka_runs_in_kraft_mode_and_advertises_the_address_clients_use(
    services: dict[str, Any],
) -> None:
    env = services["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"]
    cluster_id = env["CLUSTER_ID"].split(":-")[-1].rstrip("}")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)  # base64 of a 16-byte UUID
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for name in ("airflow-scheduler", "airflow-dag-processor", *LAMBDALAKE_SERVICES):
        bootstrap = services[name]["environment"]["LAMBDALAKE_KAFKA_BOOTSTRAP"]
        assert f"PLAINTEXT://{bootstrap}" in advertised, name
    assert _mounts(services["kafka"])["/var/lib/kafka/data"] == "kafka-data"


def test_every_process_shares_one_lake_volume(services: dict[str, Any]) -> None:
    for name in ("airflow-scheduler", "airflow-dag-processor", *LAMBDALAKE_SERVICES):
        service = services[name]
        assert service["environment"]["LAMBDALAKE_LAKE_URI"] == "/lake", name
        assert _mounts(service)["/lake"] == "lake", name


def test_airflow_uses_postgres_and_one_configuration(services: dict[str, Any]) -> None:
    pg = services["postgres"]["environment"]
    envs = [services[n]["environment"] for n in ("airflow-init", *AIRFLOW_SERVICES)]
    for env in envs:
        conn = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert conn.startswith(f"postgresql+psycopg2://{pg['POSTGRES_USER']}:")
        assert conn.endswith(f"@postgres:5432/{pg['POSTGRES_DB']}")
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/lambdalake/dags"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith(
            "http://airflow-apiserver:8080/"
        )
        # Secrets are required from the operator, never defaulted in the file.
        for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"):
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", env[key]), key
    # Every Airflow process sees the same settings (tasks run in the scheduler).
    common = {k: v for k, v in envs[1].items()}
    for env in envs[2:]:
        assert {k: env[k] for k in common} == common
    # The admin password written by the init job is the file the auth manager reads.
    init_script = _command(services["airflow-init"])[2]
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in init_script
    auth_dir = str(Path(envs[1]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).parent)
    for name in ("airflow-init", "airflow-apiserver"):
        assert _mounts(services[name])[auth_dir] == "airflow-auth"


def test_lambdalake_variables_are_real_settings(services: dict[str, Any]) -> None:
    fields = {f"LAMBDALAKE_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("LAMBDALAKE_")} - (
            fields | LOG_VARIABLES
        )
        assert unknown == set(), name


def test_speed_workers_cover_every_partition_and_the_api_finds_them(
    services: dict[str, Any],
) -> None:
    specs = {}
    for name in ("speed-0", "speed-1"):
        argv = _command(services[name])
        specs[name] = argv[argv.index("--worker") + 1]
    assert sorted(specs.values()) == ["0/2", "1/2"]
    endpoints = services["serve"]["environment"]["LAMBDALAKE_SPEED_ENDPOINTS"].split(",")
    for name in specs:
        argv = _command(services[name])
        port = argv[argv.index("--query-port") + 1]
        assert f"grpc://{name}:{port}" in endpoints
        assert argv[argv.index("--query-host") + 1] == "0.0.0.0"  # reachable from `serve`
    argv = _command(services["serve"])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_health_checks_and_start_order(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name != "airflow-init":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in {"service_healthy", "service_completed_successfully"}
            if cond["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), dep
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
    declared = set(compose["volumes"])
    for service in services.values():
        assert set(_mounts(service).values()) <= declared


_DEFAULTED = re.compile(r"\$\{([A-Z_]+):-([^}]*)\}")
REQUIRED = re.compile(r"\$\{([A-Z_]+):\?[^}]+\}")


def _published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port, with every
    ``${VAR:-default}`` as its default (what an operator gets without setting VAR)."""
    out = []
    for spec in service.get("ports", []):
        address, host_port, container_port = _DEFAULTED.sub(r"\2", spec).rsplit(":", 2)
        out.append((address, host_port, container_port))
    return out


def test_published_ports_bind_the_loopback_by_default(services: dict[str, Any]) -> None:
    published = {name: _published(s) for name, s in services.items() if s.get("ports")}
    assert published == {
        "airflow-apiserver": [("127.0.0.1", "8080", "8080")],
        "serve": [("127.0.0.1", "8000", "8000")],
        "kafka": [("127.0.0.1", "29092", "29092")],
    }
    # One variable opens them all, deliberately (behind a firewall or a TLS proxy).
    for name in published:
        for spec in services[name]["ports"]:
            assert spec.startswith("${LAMBDALAKE_PUBLISH_ADDRESS:-127.0.0.1}:"), name


def test_api_and_flight_require_secrets_and_kafka_plaintext_stays_private(
    services: dict[str, Any],
) -> None:
    serve = services["serve"]["environment"]
    assert REQUIRED.fullmatch(serve["LAMBDALAKE_API_KEYS"])
    for name in ("speed-0", "speed-1", "serve"):
        token = services[name]["environment"]["LAMBDALAKE_SPEED_TOKEN"]
        assert REQUIRED.fullmatch(token), name
        assert REQUIRED.fullmatch(token).group(1) == "LAMBDALAKE_SPEED_TOKEN"
    # The Flight port (8815) is reachable on the compose network only.
    for name in ("speed-0", "speed-1"):
        assert "ports" not in services[name], name
    # Kafka's PLAINTEXT listeners: the internal one unpublished, the host one on loopback.
    env = services["kafka"]["environment"]
    protocols = dict(kv.split(":") for kv in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    plaintext = {name for name, proto in protocols.items() if proto == "PLAINTEXT"}
    listener_ports = {
        listener.split("://")[0]: listener.rsplit(":", 1)[1]
        for listener in env["KAFKA_LISTENERS"].split(",")
    }
    published = {host_port: address for address, host_port, _ in _published(services["kafka"])}
    for name in plaintext:
        port = listener_ports[name]
        assert published.get(port, "127.0.0.1") == "127.0.0.1", f"{name} listener published"


def test_no_example_secret_in_the_stack_or_the_env_example(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / "docs" / "production.env.example").read_text()
    assert "change-me" not in text.lower() and "change-me" not in example.lower()
    values = dict(
        line.split("=", 1)
        for line in example.splitlines()
        if line.strip() and not line.startswith("#")
    )
    required = set(REQUIRED.findall(text))
    assert required >= {
        "POSTGRES_PASSWORD",
        "AIRFLOW_ADMIN_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "LAMBDALAKE_API_KEYS",
        "LAMBDALAKE_SPEED_TOKEN",
    }
    # Every required secret is listed, empty: a copied example does not start.
    assert {k: values.get(k) for k in required} == dict.fromkeys(required, "")
    assert not re.search(r"\$\{[A-Z_]*(KEY|SECRET|PASSWORD|TOKEN)[A-Z_]*:-", text)


def _cli_options(words: list[str]) -> set[str] | None:
    command = typer.main.get_command(cli_app)
    for word in words:
        # Typer vendors its own click: groups are recognised by their `commands` mapping.
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return None
    return {opt for p in command.params for opt in p.opts if opt.startswith("--")}


def test_every_lambdalake_command_is_a_real_sub_command_with_real_flags(
    services: dict[str, Any],
) -> None:
    problems = []
    for name, service in services.items():
        for argv in _invocations(service, "lambdalake"):
            words = [a for a in argv[1:] if not a.startswith("-")][:2]
            # `speed run` / `serve`: keep only the words that name (sub-)commands.
            while words and _cli_options(words) is None:
                words.pop()
            flags = {a for a in argv if a.startswith("--")}
            options = _cli_options(words) if words else None
            if options is None:
                problems.append(f"{name}: {argv} is not a lambdalake command")
            elif flags - options:
                problems.append(
                    f"{name}: `lambdalake {' '.join(words)}` lacks {sorted(flags - options)}"
                )
    assert problems == []


AIRFLOW_PARSE = r"""
import json, sys
from airflow.cli.cli_parser import get_parser
parser = get_parser()
bad = []
for argv in json.loads(sys.argv[1]):
    try:
        parser.parse_args(argv)
    except SystemExit:
        bad.append(argv)
print(json.dumps(bad))
"""


def test_every_airflow_command_parses_with_the_installed_airflow(
    services: dict[str, Any], tmp_path: Path
) -> None:
    calls = [argv[1:] for service in services.values() for argv in _invocations(service, "airflow")]
    calls += [
        shlex.split(services["airflow-dag-processor"]["healthcheck"]["test"][1])[1:],
    ]
    assert ["api-server", "--port", "8080"] in calls
    assert ["db", "migrate"] in calls
    proc = subprocess.run(
        [sys.executable, "-c", AIRFLOW_PARSE, json.dumps(calls)],
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_image_holds_java_the_pins_and_every_package(services: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert "openjdk-17-jre-headless" in dockerfile
    assert '-c requirements.lock ".[airflow]"' in dockerfile
    assert "psycopg2" in dockerfile  # the driver of AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pattern in packages:
        package = pattern.rstrip("*")
        assert f"COPY {package} ./{package}" in dockerfile, package
    dags_folder = services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__DAGS_FOLDER"]
    assert "COPY dags ./dags" in dockerfile
    assert dags_folder == "/opt/lambdalake/dags"
    assert re.search(r"^WORKDIR /opt/lambdalake$", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".env", "lake", ".lambdalake", ".git"):
        assert path in ignored
