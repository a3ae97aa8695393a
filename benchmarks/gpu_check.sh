#!/usr/bin/env bash
# The cupy backend on a machine with an NVIDIA GPU (spec/cupy-backend.md): installs what it needs, then runs
#   1. the conformance suite on the cupy backend (darkspec conformance, profile ci),
#   2. pytest tests/test_cupy.py (the GPU tests run here instead of skipping),
#   3. benchmarks/gpu_throughput.py (a 3-input per_channel softmax [shortcut], float32 16x256x76x76: kernel time,
#      GB/s, % of a device-to-device copy of the same bytes, speed-up over eager PyTorch).
# Run it from the repository root on a machine that has an NVIDIA driver and Python 3.10+ and nothing else:
#   bash benchmarks/gpu_check.sh
# It finishes in under 5 minutes: every step has a time limit, and the steps after a failed one still run. PyTorch
# (only for the comparison in step 3) installs in the background meanwhile; if it is not ready in time, step 3 runs
# without it and says so (DARKSPEC_SKIP_TORCH=1 leaves it out). Without access to a package index, point
# DARKSPEC_WHEELHOUSE at a folder of wheels.
# Exit status: 0 when every step passed.

set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
DEADLINE=$((START + 270))
WORK="${DARKSPEC_GPU_WORK:-${TMPDIR:-/tmp}/darkspec-gpu-check}"
VENV="$WORK/venv"
TORCH_DIR="$WORK/torch"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WORK"
declare -a SUMMARY=()
FAILED=0

elapsed() { echo $(($(date +%s) - START)); }
banner() { printf '\n==== %s (t=%ss) ====\n' "$1" "$(elapsed)"; }
# limit CAP [RESERVE]: the seconds a step may take: at most CAP, and not past the deadline less RESERVE seconds kept
# for the steps after it (at least 10)
limit() {
    local left=$((DEADLINE - ${2:-0} - $(date +%s)))
    local cap=$1
    ((left < cap)) && cap=$left
    ((cap < 10)) && cap=10
    echo "$cap"
}
# step NAME CAP RESERVE COMMAND...: run with a time limit, record the outcome
step() {
    local name=$1 cap
    cap=$(limit "$2" "$3")
    shift 3
    banner "$name (limit ${cap}s)"
    local begin=$(date +%s)
    timeout --kill-after=5 "$cap" "$@"
    local status=$?
    local took=$(($(date +%s) - begin))
    local verdict=pass
    if ((status == 124 || status == 137)); then verdict="TIMEOUT"; FAILED=1
    elif ((status != 0)); then verdict="FAIL ($status)"; FAILED=1; fi
    SUMMARY+=("$(printf '%-34s %-12s %6ss' "$name" "$verdict" "$took")")
    return $status
}

banner "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not available"
DRIVER_CUDA=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*' | grep -o '[0-9]*$' || true)
"$PYTHON" --version
echo "driver's CUDA major version: ${DRIVER_CUDA:-unknown}"

PIP_OPTIONS=(--disable-pip-version-check --quiet)
if [[ -n "${DARKSPEC_WHEELHOUSE:-}" ]]; then
    PIP_OPTIONS+=(--no-index --find-links "$DARKSPEC_WHEELHOUSE")
fi
# cupy and NVRTC for the driver's CUDA major version (CUDA 13 unless the driver says 12). cupy carries the CUDA
# runtime; NVRTC, which compiles the kernels at first use, comes from its own package.
if [[ "${DRIVER_CUDA:-13}" == 12 ]]; then
    CUDA_PACKAGES=("cupy-cuda12x>=13,<15" "nvidia-cuda-nvrtc-cu12")
else
    CUDA_PACKAGES=("cupy-cuda13x>=14,<15" "nvidia-cuda-nvrtc>=13,<14")
fi

banner "environment"
if [[ ! -x "$VENV/bin/python" ]]; then
    # --system-site-packages: what the machine already has (numpy, torch, ...) is used, not downloaded again
    "$PYTHON" -m venv --system-site-packages "$VENV" || { echo "cannot create a virtual environment"; exit 2; }
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# PyTorch (a CUDA build: the default torch wheel for Linux) in its own folder, in the background; only the
# throughput comparison needs it.
rm -f "$TORCH_DIR.log" "$TORCH_DIR.pid"
(
    if [[ -n "${DARKSPEC_SKIP_TORCH:-}" ]]; then
        echo "DARKSPEC_SKIP_TORCH is set: no PyTorch" >"$TORCH_DIR.log"
    elif python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "torch already installed" >"$TORCH_DIR.log"
    else
        pip install "${PIP_OPTIONS[@]}" --target "$TORCH_DIR" torch >"$TORCH_DIR.log" 2>&1 &
        echo $! >"$TORCH_DIR.pid"
        wait $!
    fi
    echo "exit $?" >>"$TORCH_DIR.log"
) &
TORCH_PID=$!

install() {
    pip install "${PIP_OPTIONS[@]}" numpy tabulate hypothesis pytest "${CUDA_PACKAGES[@]}" &&
        { pip install "${PIP_OPTIONS[@]}" -e . || pip install "${PIP_OPTIONS[@]}" --no-build-isolation -e .; } &&
        python -c "import cupy, darkspec; print('cupy', cupy.__version__, '| darkspec', darkspec.__version__)"
}
step "install (cupy, NVRTC, darkspec)" 120 150 bash -c "$(declare -f install); $(declare -p PIP_OPTIONS CUDA_PACKAGES); install"

step "cupy backend availability" 60 130 python - <<'EOF'
from darkspec.backends.cupy_backend import CupyBackend

backend = CupyBackend()
reason = backend.availability()  # compiles the float32 [shortcut] module with NVRTC
print("available" if reason is None else f"UNAVAILABLE: {reason}")
print(backend.version())
raise SystemExit(0 if reason is None else 1)
EOF

step "conformance (profile ci)" 90 100 darkspec conformance --backend darkspec.backends.cupy_backend:CupyBackend \
    --profile ci --report-dir "$WORK/reports"

step "pytest tests/test_cupy.py" 110 35 python -m pytest tests/test_cupy.py -q -rs -p no:cacheprovider

# Give the PyTorch install what is left before the throughput step needs its own time.
banner "waiting for the PyTorch install"
while kill -0 "$TORCH_PID" 2>/dev/null && (($(date +%s) < DEADLINE - 35)); do sleep 2; done
if kill -0 "$TORCH_PID" 2>/dev/null; then
    echo "PyTorch is not installed yet: the throughput runs without the eager-PyTorch comparison"
    [[ -f "$TORCH_DIR.pid" ]] && kill "$(cat "$TORCH_DIR.pid")" 2>/dev/null
    kill "$TORCH_PID" 2>/dev/null
    TORCH_PATH=""
else
    tail -n 3 "$TORCH_DIR.log"
    TORCH_PATH="$TORCH_DIR"
fi

step "throughput 16x256x76x76 float32" 40 0 env PYTHONPATH="${TORCH_PATH:+$TORCH_PATH:}${PYTHONPATH:-}" \
    python benchmarks/gpu_throughput.py --repeats 30 --json "$WORK/reports/gpu_throughput.json"

banner "summary"
printf '%-34s %-12s %7s\n' "step" "verdict" "time"
printf '%-34s %-12s %7s\n' "----------------------------------" "------------" "-------"
printf '%s\n' "${SUMMARY[@]}"
printf 'total: %ss; reports in %s\n' "$(elapsed)" "$WORK/reports"
exit $FAILED
