"""The command line: every sub-command has --help; failures are one line and non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """A long-running command in the background (stderr kept for the failure message)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
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


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_serve_runs_with_arrow_on_malloc_in_the_process_it_was_started_as(tmp_path) -> None:
    """`serve` starts itself again (exec: the same process) with Arrow on the C library's
    malloc, so what a reload frees goes back to the OS (lambdalake/memory.py)."""
    import time

    import httpx

    from lambdalake.ops.broker import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    env["LAMBDALAKE_HOME"] = str(tmp_path)
    proc = start_cli("serve", "--port", str(port), "--lake", str(tmp_path / "lake"), env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                if metrics.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve did not answer"
            time.sleep(0.2)
        assert 'lambdalake_arrow_allocated_bytes{backend="system"}' in metrics.text
        with open(f"/proc/{proc.pid}/environ", "rb") as f:  # the process started, re-executed
            assert b"ARROW_DEFAULT_MEMORY_POOL=system" in f.read().split(b"\0")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_demo_stops_on_a_signal_while_it_waits_for_an_external_broker(tmp_path) -> None:
    """Given a broker that does not answer (yet), the demo waits for it up to
    LAMBDALAKE_BROKER_WAIT_SECONDS; SIGTERM or Ctrl-C must end that wait, not be ignored."""
    import time

    from lambdalake.ops.broker import free_port

    env = {**os.environ, "LAMBDALAKE_HOME": str(tmp_path), "LAMBDALAKE_BROKER_WAIT_SECONDS": "300"}
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = start_cli("demo", "--lake", str(tmp_path / "lake"), "--bootstrap", bootstrap, env=env)
    try:
        time.sleep(5)  # started, and waiting for the broker
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.terminate()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err = proc.stderr.read()[-3000:] if proc.stderr else ""
            pytest.fail(f"the demo did not stop within 15 s of SIGTERM; its log: {err}")
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_waiting_for_a_broker_that_is_not_there_leaves_no_client_behind() -> None:
    """Each failed KafkaAdminClient bootstrap left its I/O thread and sockets running: a
    300-second wait for a broker made ~130 of them. While nothing listens, no client."""
    import threading

    from lambdalake.errors import Unreachable
    from lambdalake.kafka.clients import wait_for_broker
    from lambdalake.ops.broker import free_port

    def kafka_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io"))

    before = kafka_threads()
    with pytest.raises(Unreachable, match="no Kafka broker answering"):
        wait_for_broker(f"127.0.0.1:{free_port()}", timeout=5)
    assert kafka_threads() == before


def test_unreachable_broker_is_a_one_line_error(tmp_path) -> None:
    from lambdalake.ops.broker import free_port

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


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({}, "LAMBDALAKE_SPEED_TOKEN is empty"),
        ({"LAMBDALAKE_SPEED_TOKEN": "change-me"}, "example value"),
        ({"LAMBDALAKE_SPEED_TOKEN": "short-token"}, "fewer than 16"),
    ],
)
def test_a_speed_worker_will_not_serve_other_machines_unauthenticated(
    tmp_path: Path, env: dict[str, str], fragment: str
) -> None:
    """Bound beyond the loopback, a worker needs a real token: it refuses to start, in one
    line, before it binds or reads anything."""
    proc = run_cli(
        "speed",
        "run",
        "--query-host",
        "0.0.0.0",
        "--query-port",
        "0",
        env={
            "LAMBDALAKE_HOME": str(tmp_path),
            "LAMBDALAKE_BOOTSTRAP": "127.0.0.1:1",
            "LAMBDALAKE_SPEED_TOKEN": "",
            **env,
        },
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lambdalake: error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_check_query_auth_accepts_loopback_a_real_token_or_an_explicit_opt_out() -> None:
    from lambdalake.settings import Settings
    from speed.worker import check_query_auth

    def settings(**kw: object) -> Settings:
        return Settings(_env_file=None, **kw)  # type: ignore[call-arg,arg-type]

    check_query_auth(settings(speed_token=""), "127.0.0.1")
    check_query_auth(settings(speed_token=""), "::1")
    check_query_auth(settings(speed_token="a" * 24), "0.0.0.0")
    check_query_auth(settings(speed_token="", speed_allow_unauthenticated=True), "0.0.0.0")
    with pytest.raises(ValueError, match="reachable from other machines"):
        check_query_auth(settings(speed_token=""), "10.0.0.5")
