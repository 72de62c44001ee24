"""``lambdalake airflow``: Airflow standalone with the project's DAGs, then a clean stop.

The real thing: the command starts Airflow (SQLite, AIRFLOW_HOME under the
state directory), prints the UI URL and the generated login; the REST API
answers with that login and lists the three DAGs; SIGTERM stops every process
it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lambdalake.ops.broker import free_port

DAG_IDS = {"lambdalake_batch", "lambdalake_maintenance", "lambdalake_reprocess"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_lambdalake_airflow_serves_the_dags_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "LAMBDALAKE_HOME": str(home),
        "LAMBDALAKE_LAKE_URI": str(tmp_path / "lake"),
    }
    lambdalake = Path(sys.executable).with_name("lambdalake")
    with (tmp_path / "airflow.log").open("wb") as err:
        proc = subprocess.Popen(
            [str(lambdalake), "airflow", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 300
            while not any(line.startswith("login:") for line in lines):
                assert proc.poll() is None, (tmp_path / "airflow.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no login line in 300 s"
                time.sleep(0.5)
            out = "".join(lines)
            assert f"Airflow UI: http://127.0.0.1:{port}" in out
            user, password = re.search(r"login: (\S+) / (\S+)", out).groups()
            # AIRFLOW_HOME is under the state directory, and the login is the generated one.
            stored = json.loads(
                (home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text()
            )
            assert stored == {user: password}
            assert (home / "airflow" / "airflow.db").exists()

            base = f"http://127.0.0.1:{port}"
            bad = httpx.post(f"{base}/auth/token", json={"username": user, "password": "wrong"})
            assert bad.status_code == 401
            token = httpx.post(
                f"{base}/auth/token", json={"username": user, "password": password}
            ).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(f"{base}/api/v2/dags").status_code == 401

            # The DAG processor parses dags/ shortly after start.
            found: set[str] = set()
            deadline = time.monotonic() + 120
            while not found >= DAG_IDS and time.monotonic() < deadline:
                resp = httpx.get(f"{base}/api/v2/dags", headers=headers)
                assert resp.status_code == 200
                found = {d["dag_id"] for d in resp.json()["dags"]}
                time.sleep(1)
            assert found >= DAG_IDS
            errors = httpx.get(f"{base}/api/v2/importErrors", headers=headers).json()
            assert errors["total_entries"] == 0, errors

            tree = psutil.Process(proc.pid).children(recursive=True)
            assert len(tree) >= 4  # standalone and its scheduler, dag-processor, api-server...
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert code == 0
    time.sleep(1)
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [p.cmdline() for p in alive]
