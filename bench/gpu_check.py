"""GPU figures in one call: versions, the `gpu` tests, training and the whole dev set's evaluation.

    bench/gpu_check.sh            # on a GPU box, with .whl/ carried (README: "GPU figures")
    bench/gpu_check.sh --cpu      # the same code at tiny sizes on this CPU (make test runs it)

Parts run in order, each within its own time limit and the whole within `--total` seconds from
the script's start (8 minutes on a GPU, the wheels' install included); after every part, and
after each training variant and evaluation chunk, `gpu.json` and `gpu.md` are rewritten in the
output folder, so a run cut short still leaves what it measured. A part that fails is recorded
with its error and the next part runs. With `--cpu` the JSON's fields are checked at the end and
any problem fails the run. Only the Prefect-free core (`squadtune/`) is used: the GPU box has no
Prefect, MLflow or pydantic.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_eval, gpu_report, gpu_train  # noqa: E402
from bench.gpu_kit import CARRIED, KIT, LEFT_BEHIND, data_dir, measure  # noqa: E402

# Per mode: the sizes each part runs at, its time limit (s), and the whole run's limit.
SIZES = {
    "gpu": {"train": {"shape": (12, 768), "warmup": 3, "steps": 60},
            # chunks of ~600 questions: a figure is written every ~10 batches of 64
            "eval": {"shape": (12, 768), "chunk": 600}},
    # One example a step, rows cut to 192 tokens, fp32 (this CPU has no fast bf16/fp16
    # matmuls), 12 questions.
    "cpu": {"train": {"shape": (2, 64), "warmup": 1, "steps": 1, "max_seq_len": 192,
                      "training": {"per_device_train_batch_size": 1,
                                   "gradient_accumulation_steps": 1, "bf16": False,
                                   "fp16": False}},
            "eval": {"shape": (2, 64), "chunk": 6, "questions": 12, "max_new_tokens": 3,
                     "max_seq_len": 192}},
}
LIMITS = {"gpu": {"versions": 30, "tests": 75, "train": 170, "eval": 150},
          "cpu": {"versions": 60, "tests": 60, "train": 120, "eval": 60}}
TOTAL = {"gpu": 480, "cpu": 300}
VERSIONS = ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets",
            "huggingface_hub", "tokenizers", "safetensors", "numpy")


@dataclass
class Part:
    """What a running part may spend, and the device's peak FLOP/s for MFU."""

    deadline: float
    peak_flops: float | None = None

    def left(self) -> float:
        return max(0.0, self.deadline - time.time())

    def share(self, parts: int) -> float:
        return self.left() / max(1, parts)


def versions(sizes, data, work, device, part, note) -> dict[str, Any]:
    """Library versions (and whether each came from the carried wheels), the device, and the
    carried packages' requirements that what is installed does not meet."""
    from importlib import metadata

    import torch
    from packaging.requirements import Requirement

    carried = os.environ.get("GPU_CHECK_SITE")
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": "cpu"}
    for name in VERSIONS:
        dist = metadata.distribution(name)
        where = "carried" if carried and str(dist.locate_file("")).startswith(carried) else "box"
        out[name] = dist.version + (f" ({where})" if carried else "")
        __import__(name)  # a library that does not import is this part's failure
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
    env = {"extra": ""}
    unmet = []
    for name in CARRIED:
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(env) or req.name in LEFT_BEHIND:
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} needs {req}, has {have}")
    out["unmet_requirements"] = unmet
    return out


def tests(sizes, data, work, device, part, note) -> dict[str, Any]:
    """The `gpu` tests of tests/gpu (Prefect-free) in their own process; on the CPU only
    collected, since each needs CUDA."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q",
           "--confcutdir", str(ROOT / "tests" / "gpu"), "-rA", str(ROOT / "tests" / "gpu")]
    if device == "cpu":
        cmd.append("--collect-only")
    env = {**os.environ, "SQUADTUNE_SHARED_DATA": str(data)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=part.left())
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as stopped:  # its output so far: bytes on POSIX
        out = stopped.stdout or b""
        output = out.decode(errors="replace") if isinstance(out, bytes) else out
        status = "timed out"
    lines = output.splitlines()
    # `-q --collect-only` prints one test id a line; `-rA` one "OUTCOME id [- reason]" a line.
    ids = {w for line in lines if not line.startswith(" ") for w in line.split() if "::" in w}
    outcomes = [line for line in lines if line.split(" ", 1)[0] in OUTCOMES and "::" in line]
    result = {"exit_status": status, "collected": len(ids), "outcomes": outcomes,
              "summary": next((x for x in reversed(lines) if x.strip()), "")}
    if status != 0:
        result["output_tail"] = output[-3000:]
        raise PartFailed(result)
    return result


OUTCOMES = {"PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"}


class PartFailed(RuntimeError):
    def __init__(self, result: dict):
        super().__init__(result.get("summary", "failed"))
        self.result = result


PARTS = {"versions": versions, "tests": tests, "train": gpu_train.run, "eval": gpu_eval.run}


def run_part(name: str, report: dict, mode: str, args, part: Part, write) -> None:
    started = time.time()

    def note(partial: dict) -> None:
        report["parts"][name] = {**partial, "status": "running"}
        write(report)

    report["running"] = name
    try:
        result = PARTS[name](SIZES[mode].get(name, {}), args.data, args.work, args.device, part,
                             note)
        result["status"] = "ok"
    except PartFailed as failed:
        result = {**failed.result, "status": "failed"}
    except Exception as error:  # the next part still runs; the error is the figure
        result = {**report["parts"].get(name, {}), "status": "failed",
                  "error": f"{type(error).__name__}: {error}"[:1000],
                  "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.time() - started, 1)
    report["parts"][name] = result
    report.pop("running", None)
    write(report)


def watchdog(deadline: float, report: dict, write) -> None:
    """At the whole run's deadline, record the part still running and exit: what was measured
    stays in gpu.json."""
    def fire() -> None:
        time.sleep(max(0.0, deadline - time.time()))
        name = report.get("running")
        if name:
            report["parts"][name] = {**report["parts"].get(name, {}),
                                     "status": "stopped at the run's time limit"}
        report["problems"] = [f"the run's time limit stopped it during part {name}"] + \
            gpu_report.problems(report, strict=False)
        write(report)
        os._exit(124)

    threading.Thread(target=fire, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else .squadtune/gpu-check)")
    parser.add_argument("--started", type=float, default=None, help="epoch the run began")
    parser.add_argument("--total", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    args = parser.parse_args()
    mode = "cpu" if args.cpu else "gpu"
    started = args.started or time.time()
    deadline = started + (args.total or TOTAL[mode])
    args.out = args.out or Path(os.environ.get("OUT") or ROOT / ".squadtune" / "gpu-check")
    args.out.mkdir(parents=True, exist_ok=True)
    args.data, args.work = data_dir(), Path(tempfile.mkdtemp(prefix="gpu-check-"))
    report: dict[str, Any] = {"check": "gpu", "mode": mode, "data": str(args.data),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z",
                                                       time.localtime(started)),
                              "parts": {}}

    def write(r: dict) -> None:
        gpu_report.write(r, args.out)

    watchdog(deadline - 5, report, write)
    import torch

    args.device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        report["problems"] = ["no CUDA device here: run bench/gpu_check.sh --cpu instead"]
        write(report)
        sys.exit(2)
    peak = None
    if args.device == "cuda":
        peak, report["peak_source"] = gpu_report.peak_flops(torch.cuda.get_device_name(0))
        peak = float(os.environ["PEAK_TFLOPS"]) * 1e12 if "PEAK_TFLOPS" in os.environ else peak
    report["peak_tflops"] = peak / 1e12 if peak else None
    names = args.parts.split(",")
    for i, name in enumerate(names):
        later = sum(min(LIMITS[mode][n], 30) for n in names[i + 1:])  # what later parts keep
        limit = min(LIMITS[mode][name], deadline - time.time() - later - 10)
        run_part(name, report, mode, args, Part(time.time() + max(limit, 1.0), peak), write)
    report["seconds"] = round(time.time() - started, 1)
    report["problems"] = gpu_report.problems(report, strict=args.cpu)
    if args.cpu and KIT.is_dir():  # here, what `make gpu-wheels` made must be able to travel
        report["kit"] = measure()
        report["problems"] += [f"kit: {p}" for p in report["kit"]["problems"]]
    write(report)
    print(f"{args.out / 'gpu.json'}: {report['seconds']} s; "
          + ("; ".join(report["problems"]) or "all parts ok"))
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main()
