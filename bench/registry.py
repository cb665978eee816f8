"""The registry and the Prefect server on SQLite against PostgreSQL: registration and promotion
latency, and the flow-run load the Prefect API takes before it slows past 1 s.

    .venv/bin/python bench/registry.py [--repeat 20] [--max-flows 64] [--backends sqlite postgres]

For each backend, `deployments/servers.py up --backend B` (no workers) in a temporary state dir,
PostgreSQL's own cluster for `postgres`, then:

* registration: what `register_adapter` does once the model is logged: a new version of a run's
  model with squadtune's lineage tags, its description, and `@candidate` (median of `--repeat`);
* promotion: `squadtune promote`'s work: the registry's Prefect slot taken, the paired-bootstrap
  gate against `@staging` on 200 questions' F1s read from the runs, the alias, the version tags
  and a row appended to the history table (median of `--repeat`);
* load: K flow runs of 10 tasks kept going at once for `--seconds` (K = 1, 2, 4, ...
  `--max-flows`), every state change an event the server records, while a probe reads flow runs
  from the API every 0.25 s; the largest K whose probe p95 stays under 1 s with no flow run
  refused (503 after the client's retries).

Prints one JSON line per backend and one with the ratios. The load generator shares the machine
with the server: quote `uptime` with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUESTIONS = 200
NAME = "bench-registry"


def up(state: Path, backend: str) -> dict[str, str]:
    from bench.overhead import free_port

    servers = [sys.executable, str(ROOT / "deployments" / "servers.py")]
    subprocess.run([*servers, "up", "--state-dir", str(state), "--backend", backend,
                    "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()),
                    "--pools", "--watch"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    env = {}
    for line in (state / "servers" / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def down(state: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "deployments" / "servers.py"), "down",
                    "--state-dir", str(state)], cwd=ROOT, stdout=subprocess.DEVNULL)


def scored_run(client, experiment: str) -> str:
    """A run with the per-question predictions table the gate reads, as the pipeline logs it."""
    run_id = client.create_run(experiment).info.run_id
    client.log_table(run_id, data=pd.DataFrame({
        "id": [f"q{i}" for i in range(QUESTIONS)],
        "question": [f"question {i}?" for i in range(QUESTIONS)],
        "gold_answers": [[f"gold {i}"] for i in range(QUESTIONS)],
        "prediction": [f"answer {i}" for i in range(QUESTIONS)],
        "f1": [100.0 * (i % 2) for i in range(QUESTIONS)],
    }), artifact_file="eval/predictions.json")
    return run_id


def register(client, run_id: str) -> float:
    tags = {"eval.f1": "50.0000", "eval.set_hash": "bench", "squadtune.adapter_key": run_id,
            "squadtune.config_hash": "bench", "mlflow.run_id": run_id}
    start = time.perf_counter()
    mv = client.create_model_version(NAME, source=f"runs:/{run_id}/eval", run_id=run_id,
                                     tags=tags)
    client.update_model_version(NAME, mv.version, description="bench version")
    client.set_registered_model_alias(NAME, "candidate", mv.version)
    return time.perf_counter() - start


def promote(version: int) -> float:
    from squadtune import registry
    from tasks.registry_lock import registry_lock

    start = time.perf_counter()
    with registry_lock():
        registry.promote(NAME, "staging", version, registry.Gate())
    return time.perf_counter() - start


def registry_latency(repeat: int) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("bench-registry-runs")
    client.create_registered_model(NAME)
    runs = [scored_run(client, experiment) for _ in range(2)]
    registrations = [register(client, runs[i % 2]) for i in range(repeat)]
    promotions = [promote(1 + i % 2) for i in range(repeat)]  # v1 and v2 take turns at @staging
    return {"register_median_s": round(statistics.median(registrations), 4),
            "register_max_s": round(max(registrations), 4),
            "promote_median_s": round(statistics.median(promotions), 4),
            "promote_max_s": round(max(promotions), 4)}


PROBE = """
import json, sys, threading, time
import httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
latencies = []
with httpx.Client(timeout=60) as http:
    http.post(sys.argv[1] + "/flow_runs/filter", json={"limit": 5})  # warm
    while not stop.is_set():
        start = time.perf_counter()
        http.post(sys.argv[1] + "/flow_runs/filter", json={"limit": 5})
        latencies.append(time.perf_counter() - start)
        time.sleep(0.25)
print(json.dumps(latencies))
"""


def event_load(api: str, max_flows: int, seconds: float) -> dict:
    """Probe the API while K flow runs go at once; stop at the first K past 1 s (p95)."""
    from prefect import flow, task

    @task
    async def step(i: int) -> int:
        await asyncio.sleep(0.05)
        return i

    @flow(name="bench-load")
    async def tiny() -> None:
        for i in range(10):
            await step(i)

    async def sustain(k: int, seconds: float) -> tuple[int, int]:
        """Keep k flow runs going at once for `seconds`: (runs finished, runs that failed,
        i.e. the server refused or dropped them after the client's retries)."""
        deadline, counts = time.monotonic() + seconds, [0, 0]

        async def one_at_a_time() -> None:
            while time.monotonic() < deadline:
                try:
                    await tiny()
                except Exception:
                    counts[1] += 1
                counts[0] += 1

        await asyncio.gather(*(one_at_a_time() for _ in range(k)))
        return counts[0], counts[1]

    levels, k, fastest_slow = [], 1, None
    while k <= max_flows:
        # The probe is a process of its own: a thread here would wait for this busy process's
        # GIL and count it as the server's.
        prober = subprocess.Popen([sys.executable, "-c", PROBE, api], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        start = time.perf_counter()
        runs, failed = asyncio.run(sustain(k, seconds))
        wall = time.perf_counter() - start
        latencies = json.loads(prober.communicate("stop\n")[0])
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
        levels.append({"flows": k, "wall_s": round(wall, 2), "flow_runs": runs,
                       "runs_per_s": round(runs / wall, 2), "probes": len(latencies),
                       "p50_s": round(statistics.median(latencies), 3), "p95_s": round(p95, 3),
                       "failed_flows": failed})
        print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
        if p95 > 1.0 or failed:
            fastest_slow = k
            break
        k *= 2
    within = [lvl["flows"] for lvl in levels if lvl["p95_s"] <= 1.0 and not lvl["failed_flows"]]
    return {"levels": levels, "max_flows_under_1s": max(within) if within else 0,
            "first_past_1s": fastest_slow}


def measure(backend: str, args) -> dict:
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with tempfile.TemporaryDirectory(prefix="squadtune-bench-") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as nobody under root
        state = Path(tmp) / "state"
        env = up(state, backend)
        try:
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
                result = registry_latency(args.repeat)
                result["load"] = event_load(env["PREFECT_API_URL"], args.max_flows,
                                            args.seconds)
        finally:
            down(state)
    return {"bench": "registry", "backend": backend, "repeat": args.repeat, **result,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--max-flows", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20,
                        help="how long each load level keeps its flow runs going")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # thousands of task-run lines
    if len(args.backends) == 1:
        print(json.dumps(measure(args.backends[0], args)), flush=True)
        return
    results = {}
    for backend in args.backends:  # a process each: Prefect's client services outlive a server
        child = subprocess.run(
            [sys.executable, __file__, "--backends", backend, "--repeat", str(args.repeat),
             "--max-flows", str(args.max_flows), "--seconds", str(args.seconds)],
            check=True, capture_output=True, text=True)
        results[backend] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(results[backend]), flush=True)
    if {"sqlite", "postgres"} <= set(results):
        sqlite, pg = results["sqlite"], results["postgres"]
        print(json.dumps({"bench": "registry", "postgres_over_sqlite": {
            key: round(pg[key] / sqlite[key], 2) for key in ("register_median_s",
                                                             "promote_median_s")},
            "max_flows_under_1s": {b: results[b]["load"]["max_flows_under_1s"] for b in results},
        }))


if __name__ == "__main__":
    main()
