"""Start and stop the local services: a Prefect server, a lean MLflow server, one worker per pool,
and a data watcher per retraining deployment.

    python deployments/servers.py up      # what `make up` runs
    python deployments/servers.py down    # stops exactly what `up` started (pid files)
    python deployments/servers.py status

Everything binds 127.0.0.1 unless `--host` says otherwise, which needs credentials
(`deployments/team.py`). State lives under the state dir (default `.squadtune`): the databases
(SQLite files, or with `--backend postgres` a PostgreSQL cluster in `postgres/` or a team's server,
`deployments/postgres.py`), MLflow's artifact folder unless `--mlflow-artifacts s3://...`, and
`servers/` with each process's pid file and log, `settings.json` (where the data lives, so that the
next `up` finds it) and `env` with the variables that point clients at the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows import worker_logging

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:  # run as a script: `python deployments/servers.py`
    sys.path.insert(0, str(ROOT))

from deployments.postgres import (  # noqa: E402
    Cluster,
    PostgresError,
    Server,
    choose_settings,
    database_of,
    start_database,
)
from deployments.team import Credentials, Exposure, check_bucket  # noqa: E402


def refuse(message: str) -> None:
    """A setting the user fixes: one line, exit status 2, before anything starts."""
    print(f"servers.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None, log: Path) -> None:
    """Wait for `url` to answer; `proc` is None for a process an earlier `up` started."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}; log {log}:\n{tail}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2)
            return
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s; see {log}")


class Services:
    def __init__(self, state_dir: str):
        self.state = Path(state_dir).resolve()
        self.run_dir = self.state / "servers"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def settings(self) -> dict:
        """Where the data lives, as the first `up` chose it."""
        path = self.run_dir / "settings.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def database(self) -> Server | None:
        """The PostgreSQL server the state dir's servers use, or None for SQLite."""
        return database_of(self.settings(), self.state)

    def running(self, name: str) -> int | None:
        """The pid of our `name` process if it is alive and still the command we started."""
        path = self.pid_file(name)
        try:
            pid = int(path.read_text().split()[0])
            marker = path.read_text().split(maxsplit=1)[1].strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            return None
        return pid if marker in cmdline else None

    def start(self, name: str, command: list[str], env: dict[str, str], marker: str):
        """Start `name` unless it runs already: `up` after one service died restarts that one
        and leaves the others (a worker holding paused approvals among them) as they are."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / f"{name}.log"
        pid = self.running(name)
        if pid:
            print(f"{name}: already running (pid {pid}), left as it is")
            return None, log
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        # The marker proves at `down` time that this pid is still our process.
        self.pid_file(name).write_text(f"{proc.pid} {marker}\n")
        return proc, log

    def stop(self, name: str) -> bool:
        pid = self.running(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            if not Path(f"/proc/{pid}").exists():
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.25)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return True


def prefect_server(svc: Services, port: int, exposure: Exposure | None = None) -> None:
    """Start the Prefect server on the state dir's database, and wait for it."""
    exposure = exposure or Exposure.of("127.0.0.1", None)
    server = svc.database()
    database = (server.url("prefect", "asyncpg") if server
                else f"sqlite+aiosqlite:///{svc.state / 'prefect-server.db'}")
    env = {
        "PREFECT_HOME": str(svc.state / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{exposure.public}:{port}/api",
        "DO_NOT_TRACK": "1",
        **(server.env if server else {}),
        **Credentials.from_env().prefect_env(),
    }
    proc, log = svc.start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", exposure.bind, "--port", str(port)],
        env, f"--port {port}",
    )
    wait_http(f"http://{exposure.local}:{port}/api/health", 120, proc, log)


def mlflow_server(svc: Services, args, exposure: Exposure) -> str:
    """Start MLflow on the state dir's store and artifact destination (with its basic-auth app
    when squadtune's account is set), wait for it, and return its URL."""
    server, state, creds = svc.database(), svc.state, Credentials.from_env()
    backend = args.mlflow_backend or (
        server.url("mlflow") if server else f"sqlite:///{state / 'mlflow.db'}")
    auth_db = server.url("mlflow_auth") if server else f"sqlite:///{state / 'mlflow-auth.db'}"
    auth_args, auth_env = creds.mlflow_server(svc.run_dir, auth_db)
    port = args.mlflow_port
    proc, log = svc.start(
        "mlflow-server",
        [str(BIN / "mlflow"), "server", "--host", exposure.bind, "--port", str(port),
         "--workers", "1", "--artifacts-destination", svc.settings()["artifacts"],
         *auth_args, *exposure.mlflow_args(port)],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         # In the environment, not on the command line: a team's URL may hold a password.
         "MLFLOW_BACKEND_STORE_URI": backend, **(server.env if server else {}), **auth_env},
        f"--port {port}",
    )
    url = f"http://{exposure.local}:{port}"
    wait_http(f"{url}/health", 120, proc, log)
    problem = creds.check_mlflow_login(url)
    if problem:
        refuse(problem)
    return url


def up(args) -> None:
    svc = Services(args.state_dir)
    problem = Credentials.from_env().refusal(args.host)
    if problem:
        refuse(problem)
    exposure = Exposure.of(args.host, args.public_host)
    svc.state.mkdir(parents=True, exist_ok=True)
    svc.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        running = [p.stem for p in svc.run_dir.glob("*.pid") if svc.running(p.stem)]
        settings = choose_settings(args, svc.settings(), running, svc.state)
        problem = check_bucket(settings["artifacts"])
        if problem:
            refuse(problem)
        database, pid = start_database(settings, svc.state, args.postgres_port)
    except PostgresError as exc:
        refuse(str(exc))
    if pid:  # `down` stops it, `status` shows it
        svc.pid_file("postgres").write_text(f"{pid} {Cluster(svc.state).data}\n")
    (svc.run_dir / "settings.json").write_text(json.dumps(settings, indent=1))
    state = svc.state
    prefect_url = f"http://{exposure.local}:{args.prefect_port}"
    prefect_server(svc, args.prefect_port, exposure)
    mlflow_url = mlflow_server(svc, args, exposure)
    client_env = {
        "PREFECT_API_URL": f"{prefect_url}/api",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "SQUADTUNE_ROOT": str(ROOT),
    }
    if settings["backend"] == "postgres":
        # The Prefect API answers 500 while its database restarts: clients retry, as MLflow's do.
        client_env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] = "500"
    # Says once, not at every poll, that a run waits for its concurrency slot.
    worker_logs = str(worker_logging.write_config(svc.run_dir / "worker-logging.yml"))
    for pool in args.pools:
        svc.start(
            f"worker-{pool}",
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"squadtune-{pool}"],
            {**client_env, "PREFECT_HOME": str(state / "prefect-home"),
             "PREFECT_WORKER_QUERY_SECONDS": str(args.worker_poll_seconds),
             "PREFECT_LOGGING_SETTINGS_PATH": worker_logs,
             "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
            f"--pool {pool}",
        )
    for deployment in args.watch:  # it waits for `make deploy` to create the deployment
        svc.start(
            f"watch-{deployment.rsplit('/', 1)[-1]}",
            [str(BIN / "squadtune"), "watch", "--deployment", deployment, "--refresh",
             str(args.watch_refresh)],
            {**client_env, "PREFECT_HOME": str(state / "prefect-home")},
            f"--deployment {deployment}",
        )
    (svc.run_dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in client_env.items()))
    if database:
        print(database)
    public = f"http://{exposure.public}"
    print(f"Prefect UI + API  {public}:{args.prefect_port}   (API {prefect_url}/api)")
    print(f"MLflow UI + API   {public}:{args.mlflow_port}   (artifacts {settings['artifacts']})")
    creds = Credentials.from_env()
    if creds.mlflow:
        print(f"MLflow accounts   {creds.mlflow_user} edits the registry, everyone else reads")
    if creds.prefect or creds.mlflow:
        print("credentials       clients read them from their environment, never from a file")
    print(f"workers           {', '.join(args.pools)} (process pools)")
    if args.watch:
        print(f"data watchers     {', '.join(args.watch)} (announce changes of their data)")
    print(f"point clients at them:  source {svc.run_dir / 'env'}")


def down(args) -> None:
    svc = Services(args.state_dir)
    names = sorted(p.stem for p in svc.run_dir.glob("*.pid")) if svc.run_dir.exists() else []
    # Watchers and workers first, so no flow run starts while the servers go away; the database
    # last, once nothing uses it.
    for name in sorted(names, key=lambda n: (n == "postgres", not n.startswith(("worker-",
                                                                               "watch-")))):
        if name == "postgres":
            stopped = Cluster(svc.state).stop()
            svc.pid_file(name).unlink(missing_ok=True)
        else:
            stopped = svc.stop(name)
        print(f"{name}: {'stopped' if stopped else 'was not running'}")
    (svc.run_dir / "env").unlink(missing_ok=True)


def status(args) -> None:
    svc = Services(args.state_dir)
    for pid_file in sorted(svc.run_dir.glob("*.pid")) if svc.run_dir.exists() else []:
        pid = svc.running(pid_file.stem)
        print(f"{pid_file.stem}: {'running, pid ' + str(pid) if pid else 'not running'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=os.environ.get("SQUADTUNE_STATE", ".squadtune"))
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--pools", nargs="*", default=["local", "gpu"])
    parser.add_argument("--worker-poll-seconds", type=float, default=5)
    parser.add_argument("--watch", nargs="*", default=["finetune/finetune-retrain"],
                        help="deployments whose training data `squadtune watch` follows")
    parser.add_argument("--watch-refresh", type=float, default=60,
                        help="seconds between the watchers' reads of their deployment's config")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default=None,
                        help="the servers' databases (default: what the state dir used before, "
                        "else sqlite); postgres: a cluster in <state>/postgres unless "
                        "--database-url")
    parser.add_argument("--database-url", default=os.environ.get("SQUADTUNE_DATABASE_URL"),
                        help="a team's PostgreSQL server, postgresql://USER@HOST:PORT (password "
                        "in PGPASSWORD); its databases prefect, mlflow, mlflow_auth are used")
    parser.add_argument("--postgres-port", type=int, default=None,
                        help="port of the state dir's own cluster when it is created (default: "
                        "a free one, kept)")
    parser.add_argument("--mlflow-backend", default=None,
                        help="MLflow's store alone, e.g. postgresql://user@host/mlflow")
    parser.add_argument("--mlflow-artifacts", default=None,
                        help="e.g. s3://bucket/mlflow, endpoint from MLFLOW_S3_ENDPOINT_URL "
                        "(default: <state>/mlartifacts)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the servers bind; anything but loopback needs credentials")
    parser.add_argument("--public-host", default=None,
                        help="the name other machines and browsers use (default: --host, or "
                        "this machine's name for 0.0.0.0)")
    args = parser.parse_args()
    {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    main()
