#!/usr/bin/env bash
# GPU figures in one call (bench/gpu_check.py; README, "GPU figures").
#
#   bench/gpu_check.sh [--out DIR]   on a GPU box: installs the wheels `make gpu-wheels` put in
#                                    .whl/ (carried) into a temporary folder, then runs the check
#                                    with the box's python3; 8 minutes in all, install included
#   bench/gpu_check.sh --cpu         here: the same code at tiny sizes on the CPU, with the
#                                    project's .venv (its packages; .whl/ is never installed:
#                                    its wheels are for the box's Python 3.12)
# Writes gpu.json and gpu.md into --out, else $OUT, else .squadtune/gpu-check.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
cpu=0
for arg in "$@"; do [[ $arg == --cpu ]] && cpu=1; done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $cpu == 1 ]]; then
    python=${PYTHON:-.venv/bin/python}
else
    python=${PYTHON:-python3}
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: no wheels in .whl/: run 'make gpu-wheels' where pip reaches the" \
             "package index, and carry .whl to the GPU box" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_SITE="$site"
    echo "gpu_check: wheels installed in $(( $(date +%s) - started )) s"
fi
exec "$python" -m bench.gpu_check --started "$started" "$@"
