#!/usr/bin/env bash
# One prepared GPU session: CUDA correctness checks, then every benchmark's CUDA figures.
#   benchmarks/gpu_session.sh micro   # checks, kan_layer, epoch, hsic_step, packing (eager too): about
#                                     # 2 min on an H200 before the profiles and the eager packing run
#                                     # were added; the steps' limits add up to 570 s, under a 600 s call
#   benchmarks/gpu_session.sh grid    # paper_mnist: the whole 243-run grid through the CLI
#   benchmarks/gpu_session.sh hsic    # the HSIC step, CUDA checks, solves by size and HSIC packs (limits: 330 s)
# Logs go to $OUT (default ./gpu-out): micro writes 8 files there, the most the device tool brings
# back (a ninth would be dropped). grid needs the wheels below (carry [".whl"]); micro does not. Wheels of packages the machine lacks (sqlalchemy, greenlet,
# alembic, mako) may be put in .whl/; they are installed to /tmp/site first. To fetch them for the
# device image (Python 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl sqlalchemy greenlet alembic mako
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.txt"
    echo "=== $name rc=$rc in $((SECONDS - start))s"
}

case "${1:-micro}" in
micro)
    step cuda_checks 90 python3 benchmarks/cuda_checks.py
    step kan_layer 90 python3 benchmarks/kan_layer.py --device cuda --json "$OUT/kan_layer.json"
    step epoch 60 python3 benchmarks/epoch.py --device cuda
    step hsic_step 90 sh -c 'python3 benchmarks/hsic_step.py --device cuda --reps 20 --plain-reps 5 --profile && python3 benchmarks/hsic_solves.py --device cuda'
    step packing 160 python3 benchmarks/packing.py --device cuda --profile
    step packing_eager 80 env KANFARM_TRITON=0 python3 benchmarks/packing.py --device cuda --models mlp --profile
    ;;
hsic)
    step hsic_step 90 python3 benchmarks/hsic_step.py --device cuda --reps 50 --plain-reps 3
    step cuda_checks 100 python3 benchmarks/cuda_checks.py
    step hsic_solves 40 python3 benchmarks/hsic_solves.py --device cuda
    step packing_hsic 100 python3 benchmarks/packing.py --quick --device cuda --trainer hsic --models mlp --batches 2048
    ;;
grid)
    rm -rf /tmp/paper-mnist  # a warm machine's earlier grid: paper_mnist.py refuses to time over it
    step paper_mnist "${GRID_LIMIT:-420}" python3 benchmarks/paper_mnist.py --device cuda --pack-size auto \
        --workers "${GRID_WORKERS:-3}" --timeout "${GRID_TIMEOUT:-360}" --workdir /tmp/paper-mnist
    ;;
esac
