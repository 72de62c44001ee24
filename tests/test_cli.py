"""The command line: every sub-command has --help; failures are one line and non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMANDS = [
    [],
    ["broker"],
    ["generate"],
    ["generate", "history"],
    ["generate", "live"],
    ["ingest"],
    ["maintenance", "compact"],
    ["batch", "run"],
    ["speed", "run"],
    ["serve"],
    ["status"],
    ["airflow"],
    ["demo"],
]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "lambdalake.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str]) -> None:
    proc = run_cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if c and c != ["generate"]],
    ids=lambda c: " ".join(c),
)
def test_every_command_takes_bootstrap_and_lake(command: list[str]) -> None:
    out = run_cli(*command, "--help").stdout
    assert "--bootstrap" in out and "--lake" in out


def test_status_json_on_an_empty_lake(tmp_path) -> None:
    proc = run_cli("status", "--json", "--lake", str(tmp_path / "lake"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["batch"]["run_id"] is None
    assert report["speed"]["workers"] == []
    assert report["quarantine"] == {}


def test_unreachable_broker_is_a_one_line_error(tmp_path) -> None:
    from lambdalake.broker import free_port

    proc = run_cli(
        "ingest",
        "--until-end",
        "--bootstrap",
        f"127.0.0.1:{free_port()}",
        "--lake",
        str(tmp_path / "lake"),
        env={"LAMBDALAKE_HOME": str(tmp_path), "LAMBDALAKE_BROKER_WAIT_SECONDS": "3"},
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lambdalake: error:")
    assert "Traceback" not in proc.stderr


def test_bad_worker_spec_is_rejected() -> None:
    proc = run_cli("speed", "run", "--worker", "3/2")
    assert proc.returncode != 0
    assert "0 <= I < N" in proc.stderr


def test_invalid_setting_is_a_one_line_error(tmp_path) -> None:
    proc = run_cli("status", "--json", env={"LAMBDALAKE_PARTITIONS": "zero"})
    assert proc.returncode == 1
    assert proc.stderr.startswith("lambdalake: error: invalid settings")
