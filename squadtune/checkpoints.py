"""Which training checkpoint a resumed run starts from: the newest one that loads.

A checkpoint can be cut short by a crash or damaged on disk afterwards. Files existing is not
enough: each checkpoint's files are read the way resuming reads them (the trainer state parsed,
every safetensors tensor read, every torch file's zip checksums tested) and, when the checkpoint
carries `checksums.json` (written right after the Trainer saved it), their sha256 compared.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from squadtune.hashing import sha256_file

CHECKSUMS = "checksums.json"
TORCH_FILES = (".pt", ".pth", ".bin")  # torch.save's zip format, each member CRC-checked


def step_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                fh.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types
        return f"{path.name} does not load ({str(exc).splitlines()[0]})"
    return None


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when every file of it loads."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not parse ({exc})"
    adapter = checkpoint / "adapter_model.safetensors"
    if not adapter.is_file():
        return "adapter_model.safetensors is missing"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            wrong = _safetensors_problem(path)
        elif path.suffix in TORCH_FILES:
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                wrong = f"{path.name} is corrupt (member {bad})" if bad else None
            except (OSError, zipfile.BadZipFile) as exc:
                wrong = f"{path.name} does not load ({exc})"
        else:
            continue
        if wrong:
            return wrong
    try:
        expected = json.loads((checkpoint / CHECKSUMS).read_text())
    except (OSError, ValueError):
        expected = {}
    # Bytes that load but changed (no format checksum covers safetensors data).
    for name, digest in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} changed since it was saved (sha256 differs)"
    return None


def resume_point(directory: Path, max_steps: int) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that loads, and one line per newer one skipped and why.

    A checkpoint past `max_steps` is skipped: the Trainer, resumed from its last step, trains one
    more step and saves it, and resuming from that one would train past the end again.
    """
    found = sorted(
        (step, path) for path in directory.glob("checkpoint-*")
        if (step := step_of(path)) is not None and path.is_dir()
    )
    skipped = []
    for step, path in reversed(found):
        wrong = problem(path) if step <= max_steps else f"past max_steps={max_steps}"
        if wrong is None:
            return path, skipped
        skipped.append(f"{path.name}: {wrong}")
    return None, skipped


def describe(resume: Path | None, skipped: list[str], max_steps: int) -> str | None:
    """What a run says about where it starts: nothing for a plain first run."""
    if not skipped:
        return f"resuming from {resume.name} (step {step_of(resume)} of {max_steps})" if (
            resume) else None
    why = "; ".join(skipped)
    if resume is None:
        return f"no checkpoint loads ({why}): training starts over from step 0"
    return f"skipping checkpoints that do not load ({why}): resuming from {resume.name} " \
        f"(step {step_of(resume)} of {max_steps})"


def checksum_callback():
    """A Trainer callback recording the sha256 of each file of a checkpoint once it is saved."""
    from transformers import TrainerCallback

    class RecordChecksums(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                sums = {p.name: sha256_file(p) for p in sorted(checkpoint.iterdir())
                        if p.is_file() and p.name != CHECKSUMS}
                tmp = checkpoint / f".{CHECKSUMS}.tmp"
                tmp.write_text(json.dumps(sums, indent=1))
                tmp.replace(checkpoint / CHECKSUMS)

    return RecordChecksums()
