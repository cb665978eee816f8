"""Start and stop the local services: a Prefect server, a lean MLflow server, one worker per pool,
and a data watcher per retraining deployment.

    python deployments/servers.py up      # what `make up` runs
    python deployments/servers.py down    # stops exactly what `up` started (pid files)
    python deployments/servers.py status

Everything binds 127.0.0.1. State lives under the state dir (default `.squadtune`): the Prefect
server's SQLite database, MLflow's SQLite store and artifact folder, and `servers/` with each
process's pid file and log, plus `servers/env` with the variables that point clients at them.
PostgreSQL and object stores: see the README (`--mlflow-backend`, `--mlflow-artifacts`).
"""

from __future__ import annotations

import argparse
import contextlib
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


def prefect_server(svc: Services, port: int) -> None:
    """Start the Prefect server on its SQLite database in the state dir, and wait for it."""
    url = f"http://127.0.0.1:{port}"
    env = {
        "PREFECT_HOME": str(svc.state / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL":
            f"sqlite+aiosqlite:///{svc.state / 'prefect-server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{url}/api",
        "DO_NOT_TRACK": "1",
    }
    proc, log = svc.start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env, f"--port {port}",
    )
    wait_http(f"{url}/api/health", 120, proc, log)


def up(args) -> None:
    svc = Services(args.state_dir)
    state = svc.state
    state.mkdir(parents=True, exist_ok=True)
    prefect_url = f"http://127.0.0.1:{args.prefect_port}"
    mlflow_url = f"http://127.0.0.1:{args.mlflow_port}"
    backend = args.mlflow_backend or f"sqlite:///{state / 'mlflow.db'}"
    artifacts = args.mlflow_artifacts or str(state / "mlartifacts")
    prefect_server(svc, args.prefect_port)
    proc, log = svc.start(
        "mlflow-server",
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(args.mlflow_port),
         "--workers", "1", "--backend-store-uri", backend, "--artifacts-destination", artifacts],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        f"--port {args.mlflow_port}",
    )
    wait_http(f"{mlflow_url}/health", 120, proc, log)
    client_env = {
        "PREFECT_API_URL": f"{prefect_url}/api",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "SQUADTUNE_ROOT": str(ROOT),
    }
    for pool in args.pools:
        svc.start(
            f"worker-{pool}",
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"squadtune-{pool}"],
            {**client_env, "PREFECT_HOME": str(state / "prefect-home"),
             "PREFECT_WORKER_QUERY_SECONDS": str(args.worker_poll_seconds),
             # Says once, not at every poll, that a run waits for its concurrency slot.
             "PREFECT_LOGGING_SETTINGS_PATH": str(worker_logging.write_config(
                 svc.run_dir / "worker-logging.yml")),
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
    print(f"Prefect UI + API  {prefect_url}   (API {prefect_url}/api)")
    print(f"MLflow UI + API   {mlflow_url}")
    print(f"workers           {', '.join(args.pools)} (process pools)")
    if args.watch:
        print(f"data watchers     {', '.join(args.watch)} (announce changes of their data)")
    print(f"point clients at them:  source {svc.run_dir / 'env'}")


def down(args) -> None:
    svc = Services(args.state_dir)
    names = sorted(p.stem for p in svc.run_dir.glob("*.pid")) if svc.run_dir.exists() else []
    # Watchers and workers first, so no flow run starts while the servers go away.
    for name in sorted(names, key=lambda n: not n.startswith(("worker-", "watch-"))):
        print(f"{name}: {'stopped' if svc.stop(name) else 'was not running'}")
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
    parser.add_argument("--mlflow-backend", default=None,
                        help="e.g. postgresql://user:pw@127.0.0.1/mlflow (default: SQLite)")
    parser.add_argument("--mlflow-artifacts", default=None,
                        help="e.g. s3://bucket/mlflow (default: <state>/mlartifacts)")
    args = parser.parse_args()
    {"up": up, "down": down, "status": status}[args.command](args)


if __name__ == "__main__":
    main()
