"""What Prefect and MLflow add: a fully cached re-run of the demo flow against running servers.

    .venv/bin/python bench/overhead.py [--config demo] [overrides ...]

Starts a Prefect server, an MLflow server and workers on free loopback ports in a temporary state
dir (`deployments/servers.py up`), runs the demo flow once with `squadtune run` to fill every cache,
then times two fully cached re-runs (the whole `squadtune run` process, wall clock), reads each
task run's duration from the Prefect API, and stops the servers. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not (start and end):
        return None
    parse = datetime.fromisoformat
    return (parse(end) - parse(start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    servers = [sys.executable, str(ROOT / "deployments" / "servers.py")]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        ports = (free_port(), free_port())
        common = ["--state-dir", str(state)]
        subprocess.run([*servers, "up", *common, "--prefect-port", str(ports[0]),
                        "--mlflow-port", str(ports[1]), "--pools"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        env = dict(os.environ)
        for line in (state / "servers" / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        run = [str(Path(sys.executable).parent / "squadtune"), "run", "--config", args.config,
               f"tracking.state_dir={state / 'runs'}", *args.overrides]
        try:
            start = time.perf_counter()
            subprocess.run(run, check=True, cwd=ROOT, env=env, capture_output=True)
            first = time.perf_counter() - start
            walls = []
            for _ in range(2):
                start = time.perf_counter()
                subprocess.run(run, check=True, cwd=ROOT, env=env, capture_output=True)
                walls.append(time.perf_counter() - start)
            api = f"http://127.0.0.1:{ports[0]}/api"
            flow_run = httpx.post(f"{api}/flow_runs/filter",
                                  json={"sort": "START_TIME_DESC", "limit": 1}).json()[0]
            tasks = httpx.post(f"{api}/task_runs/filter", json={
                "flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
        finally:
            subprocess.run([*servers, "down", *common], cwd=ROOT, stdout=subprocess.DEVNULL)
    per_task = {
        t["name"].rsplit("-", 1)[0]: round(seconds(t["start_time"], t["end_time"]) or 0.0, 3)
        for t in tasks
    }
    flow_seconds = seconds(flow_run["start_time"], flow_run["end_time"])
    print(json.dumps({
        "bench": "overhead",
        "config": args.config,
        "first_run_s": round(first, 1),
        "cached_rerun_wall_s": [round(w, 2) for w in walls],
        "cached_flow_run_s": round(flow_seconds, 2),
        "process_and_prefect_startup_s": round(min(walls) - flow_seconds, 2),
        "cached_task_run_s": per_task,
        "states": sorted({t["state_name"] for t in tasks}),
        "goal_cached_rerun_s": 15,
    }))


if __name__ == "__main__":
    main()
