#!/usr/bin/env bash
# Device checks of the CUDA backend, run from the repo root ON THE GPU MACHINE:
#   bash tests/gpu/run_device_checks.sh
# 1. OpenBLAS wheel from .whl/ (if present) into /tmp/site; 2. build with nvcc for sm_90 (all
# cores); 3. nvidia-smi; 4. the GPU tests (tests/gpu, -m gpu); 5. the GPU op benchmark and
# 6. the training-step benchmark in fp32 and bf16 (JSON, with the bf16 speed-up) and
# 7. afire vs the same step in PyTorch (JSON).
# Options (environment): SKIP_BENCH=1 skips 5-7; EVAL_SCALE=1 adds 8. `afire pretrain --device
# cuda` on phantoms (the loop, its checkpoint loaded on the CPU) and 9. benchmarks/eval_scale.py
# (pre-training vs random init at vit_tiny 224 px) on $AFIRE_DATA/kermany_native.
# Logs and JSON go to $OUT (or /tmp/afire_device_checks). Every step runs even if an earlier one
# failed where that still makes sense; the exit status is non-zero at the END if any step
# failed or no GPU was visible. Budget: under 8 minutes on 16 cores.
set -o pipefail
ROOT="$(pwd)"
DEST="${OUT:-/tmp/afire_device_checks}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
: >"$SUMMARY"
failed=()
note() { echo "== $*" | tee -a "$SUMMARY"; }
step_ok() { note "OK    $1"; }
step_fail() { note "FAIL  $1"; failed+=("$1"); }
T0=$(date +%s)

# 1. the OpenBLAS wheel (setup.py imports scipy_openblas32 for its headers and library)
if compgen -G ".whl/*.whl" >/dev/null; then
    if python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 |
        tee "$DEST/pip.log"; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        step_ok "wheels from .whl/ installed into /tmp/site"
    else
        step_fail "pip install of .whl/*.whl"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"

{
    echo "python: $(python3 --version 2>&1)"
    echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
    python3 -c "import numpy, scipy_openblas32; print('numpy', numpy.__version__, 'openblas', scipy_openblas32.__version__)" 2>&1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
} | tee "$DEST/env.txt"

# 2. build (nvcc jobs in parallel: AFIRE_NVCC_JOBS defaults to all cores in setup.py)
if timeout 300 env AFIRE_CUDA=1 AFIRE_CUDA_ARCH="${AFIRE_CUDA_ARCH:-90}" \
    python3 setup.py -q build_ext --inplace --force 2>&1 | tee "$DEST/build.log"; then
    step_ok "build (AFIRE_CUDA=1, sm_${AFIRE_CUDA_ARCH:-90}) in $(($(date +%s) - T0)) s"
    built=1
else
    step_fail "build (see build.log)"
    built=0
fi

# 3. the device
if nvidia-smi 2>&1 | tee "$DEST/nvidia-smi.txt"; then step_ok "nvidia-smi"; else step_fail "nvidia-smi"; fi
ngpu=0
if [ "$built" = 1 ]; then
    ngpu=$(python3 -c "from afire import cuda; print(cuda.device_count())" 2>>"$DEST/env.txt" || echo 0)
    python3 -c "from afire import cuda; print('afire cuda', cuda.compiled(), cuda.device_count(), cuda.versions() if cuda.device_count() else '')" 2>&1 | tee -a "$DEST/env.txt"
fi
note "afire sees $ngpu GPU(s)"

# 4. GPU tests (they skip with a visible reason when no GPU is visible)
if [ "$built" = 1 ]; then
    if timeout 300 python3 -m pytest -q -m gpu tests/gpu -rs 2>&1 | tee "$DEST/pytest_gpu.log"; then
        step_ok "pytest -m gpu tests/gpu ($(tail -1 "$DEST/pytest_gpu.log"))"
    else
        step_fail "pytest -m gpu tests/gpu ($(tail -1 "$DEST/pytest_gpu.log"))"
    fi
fi

# 5. benchmark: ours vs PyTorch on ViT-B shapes
bench=1
[ "${SKIP_BENCH:-0}" = 1 ] && bench=0
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    if timeout 150 python3 benchmarks/bench_gpu_ops.py --out "$DEST/bench_gpu_ops.json" 2>&1 |
        tee "$DEST/bench_gpu_ops.log"; then
        step_ok "benchmark -> bench_gpu_ops.json"
    else
        step_fail "benchmark (see bench_gpu_ops.log)"
    fi
fi

# 6. the full training step on the GPU: images/s and memory (vit_small, vit_base at B=64),
#    precision fp32 and bf16 (each model built, timed and freed in turn)
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    if timeout 180 python3 benchmarks/bench_gpu_step.py --out "$DEST/bench_gpu_step.json" 2>&1 |
        tee "$DEST/bench_gpu_step.log"; then
        step_ok "training-step benchmark -> bench_gpu_step.json (bf16 speed-up: $(python3 -c \
            "import json; print(json.load(open('$DEST/bench_gpu_step.json')).get('speedup_bf16_over_fp32'))" 2>&1))"
    else
        step_fail "training-step benchmark (see bench_gpu_step.log)"
    fi
fi

# 7. the same step in PyTorch (fp32 TF32 off, bf16 autocast) vs afire, one process (JSON)
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    if timeout 180 python3 benchmarks/bench_gpu_vs_torch.py --out "$DEST/bench_gpu_vs_torch.json" \
        2>&1 | tee "$DEST/bench_gpu_vs_torch.log"; then
        step_ok "afire vs PyTorch step benchmark -> bench_gpu_vs_torch.json"
    else
        step_fail "afire vs PyTorch step benchmark (see bench_gpu_vs_torch.log)"
    fi
fi

# 8. the pre-training loop on the GPU: a short `afire pretrain`, its checkpoint read on the CPU
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "${EVAL_SCALE:-0}" = 1 ]; then
    if timeout 120 python3 -m afire.cli pretrain --device cuda --epochs 3 --phantoms 256 \
        --out /tmp/afire_pretrain_gpu --overwrite --quiet 2>&1 | tee "$DEST/pretrain_gpu.log" &&
        python3 -c "import afire; m = afire.AFiRe.load('/tmp/afire_pretrain_gpu/last.safetensors'); print('loaded on the cpu: step', m.step)" 2>&1 | tee -a "$DEST/pretrain_gpu.log"; then
        step_ok "afire pretrain --device cuda ($(grep -c . "$DEST/pretrain_gpu.log") log lines)"
    else
        step_fail "afire pretrain --device cuda (see pretrain_gpu.log)"
    fi
fi

# 9. pre-training vs random initialisation at vit_tiny scale (JSON)
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "${EVAL_SCALE:-0}" = 1 ]; then
    if timeout "${EVAL_SCALE_TIMEOUT:-300}" python3 benchmarks/eval_scale.py --device cuda \
        --data "${AFIRE_DATA:-../shared/data}/kermany_native" --preset vit_tiny --size 224 \
        --steps "${EVAL_SCALE_STEPS:-3000}" --time-budget "${EVAL_SCALE_BUDGET:-150}" --batch 64 --out "$DEST/eval_scale_vit_tiny.json" \
        2>&1 | tee "$DEST/eval_scale.log"; then
        step_ok "eval_scale vit_tiny -> eval_scale_vit_tiny.json"
    else
        step_fail "eval_scale (see eval_scale.log)"
    fi
fi

note "total $(($(date +%s) - T0)) s"
if [ "$ngpu" = 0 ]; then
    note "no CUDA GPU visible: the GPU checks could not run"
    exit 3
fi
if [ "${#failed[@]}" -gt 0 ]; then
    note "FAILED: ${failed[*]}"
    exit 1
fi
note "all device checks passed"
exit 0
