"""Ray's overhead on the training stage: `training.engine: local` against `engine: ray` with one
worker, the same stage on the same inputs, the same global batch and steps.

    .venv/bin/python bench/ray.py [--shape 12x768] [--steps 6] [--batch-size 2] [--repeat 2]
                                  [--threads 1]

Both run the training stage's own body (`train_adapter.fn`) on the outputs of the stages before
it (SQuAD dev, the real GPT-2 tokenizer, a random GPT-2 of --shape in 4-bit, LoRA r=32): local
trains in this process; ray starts a local Ray (timed alone: `ray_start_s`), uploads the inputs
to its storage, spawns one worker that copies them back, trains, reports each checkpoint and
puts the adapter on storage. Both train with --threads torch threads: a Ray worker gets as many
as the CPUs it reserves (resources_per_worker.CPU, through OMP_NUM_THREADS), so the local run is
set to the same, OpenMP pools included (on a loaded 2-core machine one thread trains 2.5-3x
faster than two, which would otherwise be credited to Ray). Per engine and repeat (alternating, so
load drifts hit both):

* `train_examples_per_s`: the Trainer's own figure (examples over its train_runtime), the steady
  state that Ray's per-step overhead (its report callback, DDP wrapper) would slow;
* `stage_examples_per_s`: examples over the stage's wall time, fixed costs included (worker
  start, model load, storage copies); for ray without the Ray start.

Prints one JSON line with the medians' ratios (ray / local) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This script's own folder would make `import ray` import this file: the project root instead.
sys.path[0] = str(ROOT)
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Read when ray is imported: the local Ray listens on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def config_dict(args, state: Path) -> dict:
    layers, width = (int(x) for x in args.shape.split("x"))
    return {
        "run_name": "bench-ray",
        "data": {"hub_dataset": None, "train_files": [args.squad], "heldout_fraction": 0.1,
                 "max_seq_len": 384},
        "model": {"name_or_path": None, "tokenizer": args.tokenizer,
                  "random_init": {"n_layer": layers, "n_head": max(1, width // 64),
                                  "n_embd": width, "n_positions": 512}},
        "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        "lora": {"lora_r": 32, "lora_alpha": 32},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
                     "learning_rate": 2e-4, "warmup_steps": 0, "logging_steps": args.steps,
                     "save_steps": args.steps,
                     "ray": {"num_workers": 1, "resources_per_worker": {"CPU": args.threads}}},
        "tracking": {"state_dir": str(state)},
    }


def stages(config, state: Path) -> dict:
    from tasks.base_model import prepare_base_model
    from tasks.format_tokenize import format_and_tokenize
    from tasks.load_squad import load_squad
    from tasks.lora import apply_lora
    from tasks.stage import Run

    run = Run(config=config, state_dir=str(state))
    tokenized = format_and_tokenize.build(run, load_squad.build(run))
    base = prepare_base_model.build(run, tokenized)
    return {"run": run, "tokenized": tokenized, "base": base,
            "lora": apply_lora.build(run, base, tokenized)}


def train_once(engine: str, s: dict, out: Path) -> dict:
    import torch

    from tasks.train import train_adapter

    config = s["run"].config
    run = s["run"].model_copy(update={"config": config.model_copy(update={
        "training": config.training.model_copy(update={"engine": engine})})})
    figures: dict = {}
    started = None
    if engine == "local":
        torch.set_num_threads(int(config.training.ray.resources_per_worker["CPU"]))
    else:
        import ray

        from tasks.ray_engine import connect

        started = time.perf_counter()
        connect(run.config.training.ray)
        figures["ray_start_s"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True)
    began = time.perf_counter()
    try:
        adapter = train_adapter.fn(run, s["lora"], s["tokenized"], s["base"], out=out)
    finally:
        if started is not None:
            ray.shutdown()
    wall = time.perf_counter() - began
    examples = adapter.global_step * config.training.global_batch_size
    # The Trainer's closing line (steps' lines carry a running train_runtime too).
    end = [h for h in json.loads((out / "log_history.json").read_text())
           if "train_samples_per_second" in h][-1]
    figures.update(stage_s=round(wall, 2), stage_examples_per_s=round(examples / wall, 3),
                   train_examples_per_s=round(examples / end["train_runtime"], 3))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", default=str(SHARED / "squad" / "dev-v1.1.json.gz"))
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    parser.add_argument("--shape", default="12x768", help="layers x width; 12x768 is GPT-2 small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both engines")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    # Before torch is imported: its own pool and every OpenMP pool (bitsandbytes' CPU kernels)
    # of this process, as Ray sets it for a worker reserving that many CPUs.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from pipeline_config import PipelineConfig

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    config = PipelineConfig.model_validate(config_dict(args, work / "state"))
    s = stages(config, work / "state")
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for i in range(args.repeat):
        for engine in ("local", "ray"):
            runs[engine].append(train_once(engine, s, work / f"{engine}-{i}"))
            print(engine, runs[engine][-1], file=sys.stderr, flush=True)

    def median(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[engine])

    print(json.dumps({
        "bench": "ray", "shape": args.shape, "steps": args.steps, "threads": args.threads,
        "global_batch": config.training.global_batch_size, "repeat": args.repeat,
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "local": runs["local"], "ray": runs["ray"],
        "ray_start_s_median": median("ray", "ray_start_s"),
        "train_examples_per_s_ratio": round(
            median("ray", "train_examples_per_s") / median("local", "train_examples_per_s"), 3),
        "stage_examples_per_s_ratio": round(
            median("ray", "stage_examples_per_s") / median("local", "stage_examples_per_s"), 3),
    }))


if __name__ == "__main__":
    main()
