#!/usr/bin/env bash
# Device checks of the CUDA backend, run from the repo root ON THE GPU MACHINE:
#   bash tests/gpu/run_device_checks.sh
# 1. OpenBLAS wheel from .whl/ (if present) into /tmp/site; 2. build with nvcc for sm_90 (all
# cores); 3. nvidia-smi; 4. the GPU tests (tests/gpu, -m gpu: every kernel vs its CPU twin, the
# step vs the CPU, both bf16 paths vs fp32, bit-identical reruns; the fast path's kernels and
# cuDNN SDPA in test_cuda_fast.py); 5. ONE benchmark run, afire (bf16 reference path and fast
# path) vs the same step in PyTorch (eager bf16 autocast + SDPA, torch.compile), vit_base and
# vit_small at B=64, vit_base at B=128: img/s, MFU, memory -> bench_gpu_vs_torch.json;
# 6. a kernel profile of one vit_base B=64 step on each bf16 path (nsys when installed, else
# torch.profiler) -> profile_bf16.json ("before") and profile_fast.json ("after");
# 7. perf_table.md, the markdown tables for docs/PERFORMANCE.md.
# Options (environment): SKIP_BENCH=1 skips 5-7; FULL=1 adds the op benchmark and the older
# step benchmark (bench_gpu_ops.py, bench_gpu_step.py); EVAL_SCALE=1 adds `afire pretrain
# --device cuda` on phantoms (the loop, its checkpoint loaded on the CPU) and
# benchmarks/eval_scale.py (pre-training vs random init at vit_tiny 224 px) on
# $AFIRE_DATA/kermany_native.
# Logs and JSON go to $OUT (or /tmp/afire_device_checks); copy the JSON files into
# benchmarks/results/ (gpu_vs_torch_<gpu>.json, profile_<path>_<gpu>.json) to record them.
# Every step runs even if an earlier one failed where that still makes sense; the exit status is
# non-zero at the END if any step failed or no GPU was visible. Budget: under 8 minutes on a
# 16-core H100 / H200 machine (build ~1.5, tests ~2, benchmark ~3.5, profiles ~1 minute).
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

# 5. afire (bf16 reference and fast paths) vs the same step in PyTorch (eager, compiled): ONE
#    process, JSON written after every row (a time-out keeps what finished)
bench=1
[ "${SKIP_BENCH:-0}" = 1 ] && bench=0
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    if timeout 330 python3 benchmarks/bench_gpu_vs_torch.py --out "$DEST/bench_gpu_vs_torch.json" \
        2>&1 | tee "$DEST/bench_gpu_vs_torch.log"; then
        step_ok "afire vs PyTorch -> bench_gpu_vs_torch.json ($(python3 -c "
import json
b = json.load(open('$DEST/bench_gpu_vs_torch.json'))
r = b['ratios'].get('vit_base@64', {})
def g(k): return ('%.2f' % r[k]['images_per_s']) if k in r else 'n/a'
rows = {x['impl']: x for x in b['rows'] if x.get('preset') == 'vit_base' and x.get('batch') == 64 and 'impl' in x}
mfu = rows.get('afire_bf16_fast', {}).get('mfu')
print('vit_base@64 fast/eager', g('afire_bf16_fast/torch_bf16_eager'), 'fast/compile',
      g('afire_bf16_fast/torch_bf16_compile'), 'MFU', 'n/a' if mfu is None else '%.1f%%' % (100 * mfu))
" 2>&1))"
    else
        step_fail "afire vs PyTorch benchmark (see bench_gpu_vs_torch.log)"
    fi
fi

# 6. where one vit_base B=64 step spends its GPU time, bf16 reference path ("before") and fast
#    path ("after"): nsys when installed, else torch.profiler
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    for path in bf16 fast; do
        prof="$DEST/profile_$path.json"
        if command -v nsys >/dev/null 2>&1; then
            if timeout 120 nsys profile --trace=cuda --sample=none --cpuctxsw=none \
                --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true \
                -o "$DEST/prof_$path" python3 benchmarks/profile_gpu_step.py --path "$path" --mark \
                >"$DEST/profile_$path.log" 2>&1 &&
                nsys stats --report cuda_gpu_kern_sum --format csv --force-export=true \
                    --output "$DEST/prof_$path" "$DEST/prof_$path.nsys-rep" >>"$DEST/profile_$path.log" 2>&1 &&
                python3 benchmarks/profile_gpu_step.py --path "$path" --summarize \
                    "$DEST/prof_${path}_cuda_gpu_kern_sum.csv" --out "$prof" >>"$DEST/profile_$path.log" 2>&1; then
                step_ok "profile ($path, nsys) -> profile_$path.json"
                rm -f "$DEST/prof_$path.nsys-rep" "$DEST/prof_$path.sqlite"
            else
                step_fail "profile ($path, nsys; see profile_$path.log)"
            fi
        elif timeout 120 python3 benchmarks/profile_gpu_step.py --path "$path" --out "$prof" \
            >"$DEST/profile_$path.log" 2>&1; then
            step_ok "profile ($path, torch.profiler: nsys not installed) -> profile_$path.json"
        else
            step_fail "profile ($path; see profile_$path.log)"
        fi
    done
fi

# 7. the tables for docs/PERFORMANCE.md
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "$bench" = 1 ]; then
    python3 benchmarks/perf_table.py "$DEST" >"$DEST/perf_table.md" 2>&1 &&
        step_ok "perf_table.md" || step_fail "perf_table.md"
fi

# FULL=1: per-op timings and the older step benchmark (fp32 and bf16 without PyTorch)
if [ "$built" = 1 ] && [ "$ngpu" != 0 ] && [ "${FULL:-0}" = 1 ]; then
    timeout 150 python3 benchmarks/bench_gpu_ops.py --out "$DEST/bench_gpu_ops.json" \
        >"$DEST/bench_gpu_ops.log" 2>&1 && step_ok "bench_gpu_ops.json" || step_fail "bench_gpu_ops"
    timeout 180 python3 benchmarks/bench_gpu_step.py --out "$DEST/bench_gpu_step.json" \
        >"$DEST/bench_gpu_step.log" 2>&1 && step_ok "bench_gpu_step.json" || step_fail "bench_gpu_step"
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
