"""What `bench/gpu_check.sh` needs on a bare GPU box, put into the git-ignored `.whl/`.

    .venv/bin/python bench/gpu_kit.py          # make gpu-wheels: download, copy, measure
    .venv/bin/python bench/gpu_kit.py --check  # measure what is there, fail if it cannot travel

The lent GPU box (see README, "GPU figures") has Python 3.12, torch, accelerate, pyarrow, pandas
and pytest, and no network. It lacks bitsandbytes, trl, datasets (and its dill, multiprocess), and
has transformers and huggingface_hub older than this project needs (squadtune calls models with
`cache=`, transformers >= 5.24, which needs huggingface_hub >= 2.4 and so httpx2). Those travel as
Python 3.12 manylinux x86_64 wheels, at the versions this virtualenv runs (the versions tested
here). `../shared/data` does not travel, so the dev set and the GPT-2 tokenizer are copied into
`.whl/data/`. Everything that travels (the tree's tracked and untracked-not-ignored files, plus
`.whl/`) must stay under the device tool's 64 MiB: this script measures it and fails above it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".whl"
LIMIT_BYTES = 64 * 2**20
# Requirements of carried packages that stay behind: transformers imports `kernels` only when
# it is installed, and its wheel alone is 2.7 MB.
LEFT_BEHIND = {"kernels"}
# Distribution -> why it travels.
CARRIED = {
    "bitsandbytes": "4-bit NF4 and paged 8-bit AdamW; not on the box",
    "transformers": "the box has 5.17; squadtune needs >= 5.24 (`cache=`)",
    "huggingface_hub": "transformers >= 5.24 needs >= 2.4; the box has 1.33",
    "httpx2": "huggingface_hub 2's HTTP client; not on the box",
    "httpcore2": "httpx2's transport; not on the box",
    "truststore": "httpx2's certificates; not on the box",
    "accelerate": "the version tested with huggingface_hub 2 (the box has 1.15)",
    "peft": "pinned 0.21 (the box's version is not pinned)",
    "trl": "SFTTrainer, the comparison; not on the box",
    "datasets": "trl's input type; not on the box",
    "dill": "datasets' pickler; not on the box",
    "multiprocess": "datasets' pool; not on the box",
}
DATA = ("squad/dev-v1.1.json.gz", "gpt2-tokenizer/vocab.json", "gpt2-tokenizer/merges.txt")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def shared_data() -> Path:
    """The shared data folder the tests read: $SQUADTUNE_SHARED_DATA or ../shared/data."""
    return Path(os.environ.get("SQUADTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def data_dir() -> Path:
    """Where the GPU check reads the dev set and tokenizer: $SQUADTUNE_SHARED_DATA, else the
    carried copy in .whl/data (on the GPU box), else ../shared/data."""
    if "SQUADTUNE_SHARED_DATA" in os.environ:
        return Path(os.environ["SQUADTUNE_SHARED_DATA"])
    carried = KIT / "data"
    return carried if (carried / DATA[0]).is_file() else shared_data()


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked files and untracked
    files git does not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")
    paths = (ROOT / os.fsdecode(n) for n in names if n)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def kit_bytes() -> int:
    return sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(name: str, version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(KIT)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, f"{name}=={version}"], check=True)


def wheel_of(name: str) -> list[Path]:
    prefix = name.replace("-", "_").lower() + "-"
    return [p for p in KIT.glob("*.whl") if p.name.lower().startswith(prefix)]


def build() -> None:
    KIT.mkdir(exist_ok=True)
    for name in CARRIED:
        version = metadata.version(name)
        stale = [p for p in wheel_of(name) if f"-{version}-" not in p.name]
        for path in stale:  # two versions of one package stop the whole install there
            path.unlink()
        if not wheel_of(name):
            download(name, version)
    source = shared_data()
    missing = [rel for rel in DATA if not (source / rel).is_file()]
    if missing:
        sys.exit(f"gpu kit: {', '.join(missing)} not under {source}: set SQUADTUNE_SHARED_DATA "
                 "to the folder holding squad/ and gpt2-tokenizer/")
    for rel in DATA:
        target = KIT / "data" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or sha256(target) != sha256(source / rel):
            shutil.copyfile(source / rel, target)


def measure() -> dict:
    """The kit's contents and sizes; `problems` says why it cannot travel (empty when it can)."""
    problems = []
    wheels = {}
    for name in CARRIED:
        found = wheel_of(name)
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} wheels in .whl/ (want exactly one)")
            continue
        wheels[name] = {"file": found[0].name, "bytes": found[0].stat().st_size}
    for rel in DATA:
        if not (KIT / "data" / rel).is_file():
            problems.append(f".whl/data/{rel} missing")
    tree, kit = tree_bytes(), kit_bytes()
    if tree + kit > LIMIT_BYTES:
        problems.append(f"tree + .whl/ = {(tree + kit) / 2**20:.1f} MiB, over the device tool's "
                        "64 MiB: carry less")
    return {"wheels": wheels, "tree_mib": round(tree / 2**20, 2), "whl_mib": round(kit / 2**20, 2),
            "total_mib": round((tree + kit) / 2**20, 2), "limit_mib": LIMIT_BYTES / 2**20,
            "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only measure what is there")
    args = parser.parse_args()
    if not args.check:
        build()
    report = measure()
    for name, wheel in report["wheels"].items():
        print(f"{wheel['bytes'] / 2**20:7.2f} MiB  {wheel['file']}  ({CARRIED[name]})")
    print(f"travels: tree {report['tree_mib']} MiB + .whl/ {report['whl_mib']} MiB = "
          f"{report['total_mib']} MiB of {report['limit_mib']:.0f} MiB")
    if report["problems"]:
        sys.exit("gpu kit cannot travel: " + "; ".join(report["problems"]))


if __name__ == "__main__":
    main()
