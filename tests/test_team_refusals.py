"""`servers.py up` refuses, before it starts anything, what would expose a team's servers or cannot
work: a non-loopback address without credentials, half of MLflow's account, a state dir PostgreSQL
cannot enter, a database URL that is not PostgreSQL's or does not answer. One line, exit status 2.
The servers themselves, with credentials, are tested in tests/test_team_servers.py (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.team import Exposure
from tests.conftest import ROOT
from tests.serving import free_port
from tests.teamservers import server_folder

SERVERS = [sys.executable, str(ROOT / "deployments" / "servers.py")]
CREDENTIALS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def up(state: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    return subprocess.run([*SERVERS, "up", "--state-dir", str(state), "--prefect-port",
                           str(free_port()), "--mlflow-port", str(free_port()), *args],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


def refusal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    return line


def started(state: Path) -> list[Path]:
    return list(state.rglob("*.pid")) + list(state.rglob("PG_VERSION"))


def test_a_public_address_without_credentials_is_refused_naming_them(tmp_path):
    line = refusal(up(tmp_path / "state", "--host", "0.0.0.0"))
    assert line.startswith("servers.py: refusing to serve on 0.0.0.0 without credentials")
    for name in CREDENTIALS:
        assert name in line
    assert "127.0.0.1" in line, "the other fix: stay on loopback"
    assert not (tmp_path / "state").exists(), "refused before anything was created"

    half = refusal(up(tmp_path / "state", "--host", "10.1.2.3",
                      MLFLOW_TRACKING_USERNAME="squadtune", MLFLOW_TRACKING_PASSWORD="x" * 20))
    assert "PREFECT_API_AUTH_STRING" in half and "MLFLOW_TRACKING_PASSWORD" not in half


def test_half_an_mlflow_account_is_refused_even_on_loopback(tmp_path):
    line = refusal(up(tmp_path / "state", MLFLOW_TRACKING_USERNAME="squadtune"))
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD go together" in line
    assert not started(tmp_path)


def test_a_database_url_not_postgres_with_a_password_or_not_answering_is_refused(tmp_path):
    line = refusal(up(tmp_path / "a", "--backend", "postgres", "--database-url",
                      "mysql://me@db.example/x"))
    assert "is not a PostgreSQL server URL" in line and "postgresql://USER@HOST:PORT" in line
    line = refusal(up(tmp_path / "c", "--backend", "postgres", "--database-url",
                      "postgresql://me:hunter2@db.example:5432"))
    assert "carries a password" in line and "export PGPASSWORD" in line
    assert "hunter2" not in line
    closed = free_port()
    line = refusal(up(tmp_path / "b", "--backend", "postgres", "--database-url",
                      f"postgresql://squadtune@127.0.0.1:{closed}"))
    assert f"PostgreSQL at 127.0.0.1:{closed} as squadtune" in line
    assert not started(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as nobody only under root")
def test_under_root_a_state_dir_nobody_cannot_enter_is_refused_naming_it(
        request, tmp_path_factory):
    private = server_folder(request, tmp_path_factory, "postgres", "refusal") / "private"
    private.mkdir(mode=0o700)
    line = refusal(up(private / "state", "--backend", "postgres"))
    assert f"nobody cannot enter {private}" in line and f"chmod o+x {private}" in line
    assert not started(private.parent)


def test_other_machines_reach_mlflow_by_the_public_name():
    assert Exposure.of("127.0.0.1", None).mlflow_args(5000) == [], "MLflow's localhost default"
    exposed = Exposure.of("0.0.0.0", "ml.team.example")
    assert (exposed.local, exposed.public) == ("127.0.0.1", "ml.team.example")
    args = exposed.mlflow_args(5000)
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert {"ml.team.example", "ml.team.example:5000", "127.0.0.1:*"} <= set(hosts)
    assert args[args.index("--cors-allowed-origins") + 1] == "http://ml.team.example:5000"
