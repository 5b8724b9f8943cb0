#!/usr/bin/env bash
# Issue 4's GPU measurements, as the two commands a lent GPU machine runs (benchmarks/GPU.md).
#
#   bash benchmarks/gpu_session.sh engine   # wheels from .whl/base; random Gemma-2-9b; matmul, parity, engine alone
#   bash benchmarks/gpu_session.sh server   # wheels from .whl/triton; the real tritonserver and hf-static, by benchmarks.bench
#
# `make gpu-wheels` fetches the wheels here. One device call carries at most 64 MiB, and the Triton
# wheel alone nearly fills that, so the stages are two calls on one warm machine: the second finds the first's
# model folder (build/ is ignored, so it stays) and installed wheels, and rebuilds what it misses.
# Each stage fits one call's 10 minutes with room to spare; every step is bounded by `timeout`.
# Figures land in $OUT (the device tool brings them back), or in build/gpu-session without it.
#
# Rehearsed on a CPU with the same commands: GPU_SESSION_DEVICE=cpu GPU_SESSION_ARCHITECTURE=tiny.
# GPU_SESSION_DTYPE=fp8 runs the engine stage in fp8 (Hopper): float32 and fp8 compared first, as the
# export's gate does; the weights are random (near-tied classes), so the gate's threshold is 0 there and
# the agreement is reported, not enforced.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh engine|server}
device=${GPU_SESSION_DEVICE:-cuda}
architecture=${GPU_SESSION_ARCHITECTURE:-gemma-2-9b}
python=${PYTHON:-python3}
model_dir=build/gemma2-9b-random-$architecture
out=${OUT:-build/gpu-session}
mkdir -p "$out"

# The machine has torch and transformers but none of these, and no registry to fetch them from.
# They go into the interpreter's own environment, not a --target folder on PYTHONPATH: the Triton
# stub builds sys.path from the `python` on PATH and ignores PYTHONPATH (seen in the rehearsal).
install_wheels() {
    if compgen -G "$1/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$1"/*.whl
    fi
}

gate=()
if [ "${GPU_SESSION_DTYPE:-}" = fp8 ]; then
    gate=(--min-top1-agreement 0)
fi
if [ "$device" = cuda ]; then
    dtype=${GPU_SESSION_DTYPE:-bfloat16} documents=512 max_batch_tokens=16384 max_batch_size=64 duration=15
    concurrency=16,64,128 rates=35 hf_batch_size=16
else
    dtype=float32 documents=16 max_batch_tokens=2048 max_batch_size=16 duration=2
    concurrency=1,4 rates=4 hf_batch_size=4
fi
install_wheels .whl/base
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" - <<'EOF' 2>&1 | tee "$out/$stage-environment.txt"
import pathlib, platform, sysconfig, torch, transformers, numpy
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"numpy {numpy.__version__}, GPU {gpu}")
# The Triton stub links libpython by soname; the launcher points LD_LIBRARY_PATH here.
libpython = pathlib.Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY")
print(f"libpython for the Triton stub: {libpython} ({'present' if libpython.exists() else 'MISSING'})")
EOF

case $stage in
engine)
    timeout 540 "$python" -m benchmarks.gpu_gemma2_9b --architecture "$architecture" --device "$device" --dtype "$dtype" \
        --model-dir "$model_dir" --documents "$documents" --max-batch-tokens "$max_batch_tokens" \
        --max-batch-size "$max_batch_size" "${gate[@]}" --out "$out/gpu_gemma2_9b${GPU_SESSION_DTYPE:+-$GPU_SESSION_DTYPE}.json" 2>&1 \
        | tee "$out/engine${GPU_SESSION_DTYPE:+-$GPU_SESSION_DTYPE}.log"
    ;;
server)
    # The Triton Python backend's stub needs numpy 1.x (requirements-nodeps.txt says why): it
    # replaces the machine's numpy 2 here, which torch and transformers run on as well.
    install_wheels .whl/numpy1
    install_wheels .whl/triton
    "$python" -m benchmarks.gpu_gemma2_9b --architecture "$architecture" --device "$device" --model-dir "$model_dir" --write-only
    timeout 540 "$python" -m benchmarks.bench --model-dir "$model_dir" --configurations triton-torch,hf-static \
        --device "$device" --dtype "$dtype" --max-batch-tokens "$max_batch_tokens" --max-batch-size "$max_batch_size" \
        --hf-batch-size "$hf_batch_size" --concurrency "$concurrency" --rates "$rates" --duration "$duration" \
        --documents 256 --mfu yes --no-progress --out "$out" 2>&1 | tee "$out/server.log"
    ;;
*)
    echo "unknown stage $stage: engine or server" >&2
    exit 2
    ;;
esac
