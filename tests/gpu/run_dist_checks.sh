#!/usr/bin/env bash
# Data-parallel checks on a GPU machine, run from the repo root:
#   bash tests/gpu/run_dist_checks.sh            # NGPU=N: use only the first N GPUs
# One GPU: steps 1-3. Two or more: 1-9.
# 1. wheels from .whl/ (scipy-openblas32 into /tmp/site; the mpich wheel, when there, into
#    /tmp/mpich for step 8), build (AFIRE_CUDA=1); 2. nvidia-smi;
# 3. pytest tests/gpu/test_cuda_dist.py: one rank through NCCL == one GPU, bit for bit;
# 4. N ranks (torchrun's variables, no torch, no MPI: the TCP rendezvous) == one GPU on the
#    combined batch (fp32, test preset, 6 steps; tests/dist_worker.py compare);
# 5. the same with unequal batches (rank 0 with fewer images);
# 6. `afire pretrain --device cuda` on N ranks: checkpoint + resume == straight run (bit for
#    bit), its checkpoint loaded on the CPU;
# 7. a hung rank: rank 0 stops with the NCCL timeout error;
# 8. with the mpich wheel: step 4 again under mpirun (the NCCL id through MPI);
# 9. step time of vit_base bf16, 64 images per GPU, on 1 and on N GPUs, overlap on and off
#    (benchmarks/bench_gpu_dist.py -> JSON): the scaling efficiency for docs/PERFORMANCE.md.
# Logs and JSON go to $OUT (default /tmp/afire_dist_checks); summary.txt lists OK/FAIL per
# step; the exit status is non-zero if any step failed. Budget: about 8 minutes on 8 GPUs.
set -o pipefail
ROOT="$(pwd)"
DEST="${OUT:-/tmp/afire_dist_checks}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.txt"
: >"$SUMMARY"
failed=()
note() { echo "== $*" | tee -a "$SUMMARY"; }
ok() { note "OK    $1"; }
fail() { note "FAIL  $1"; failed+=("$1"); }
T0=$(date +%s)
export OMP_NUM_THREADS=4 AFIRE_COMM_TIMEOUT="${AFIRE_COMM_TIMEOUT:-120}"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"

# 1. wheels and build
if compgen -G ".whl/*.whl" >/dev/null; then
    for w in .whl/*.whl; do
        case "$(basename "$w")" in
            mpich-*) python3 -m pip install -q --no-index --no-deps --prefix /tmp/mpich "$w" ;;
            *) python3 -m pip install -q --no-index --no-deps --target /tmp/site "$w" ;;
        esac
    done >"$DEST/pip.log" 2>&1 && ok "wheels from .whl/" || fail "pip install of .whl/*.whl"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if timeout 300 env AFIRE_CUDA=1 AFIRE_CUDA_ARCH="${AFIRE_CUDA_ARCH:-90}" \
    python3 setup.py -q build_ext --inplace >"$DEST/build.log" 2>&1; then
    ok "build in $(($(date +%s) - T0)) s"
else
    fail "build (see build.log)"
    exit 1
fi

# 2. the devices
nvidia-smi >"$DEST/nvidia-smi.txt" 2>&1 || fail "nvidia-smi"
ngpu=$(python3 -c "from afire import cuda; print(cuda.device_count())" 2>>"$DEST/env.txt" || echo 0)
N=${NGPU:-$ngpu}
note "afire sees $ngpu GPU(s); using $N"
[ "$ngpu" -ge 1 ] || { note "no GPU: nothing to check"; exit 3; }

# 3. one rank through NCCL == one GPU
if timeout 300 python3 -m pytest -q -m gpu tests/gpu/test_cuda_dist.py -rs \
    >"$DEST/pytest_dist.log" 2>&1; then
    ok "NCCL world 1 == one GPU ($(tail -1 "$DEST/pytest_dist.log"))"
else
    fail "NCCL world 1 == one GPU (see pytest_dist.log)"
fi

# `ranks N TAG cmd...`: cmd once per rank with torchrun's variables (each bounded by
# RANK_TIMEOUT s, default 300), logs in TAG.rank<r>.log; fails if any rank failed. (torchrun
# itself would end the other ranks once one fails; this loop leaves that to `timeout`.)
PORT=$((29400 + RANDOM % 500))
ranks() {
    local n=$1 tag=$2 r p rc=0
    shift 2
    PORT=$((PORT + 2))
    local pids=()
    for r in $(seq 0 $((n - 1))); do
        RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$PORT timeout "${RANK_TIMEOUT:-300}" "$@" >"$DEST/$tag.rank$r.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    return $rc
}

if [ "$N" -ge 2 ]; then
    W=$(printf '4,%.0s' $(seq 1 "$N"))
    W=${W%,}      # 4,4,...: 4 images per rank
    U="2${W:1}"   # 2,4,4,...: rank 0 with fewer
    # 4. N ranks == one GPU on the combined batch
    if timeout 300 python3 tests/dist_worker.py steps "$DEST/one.npz" $((4 * N)) $((4 * N)) \
        paper cuda >"$DEST/one.log" 2>&1 &&
        ranks "$N" equal python3 tests/dist_worker.py steps "$DEST/ranks.npz" 4 "$W" paper cuda &&
        python3 tests/dist_worker.py compare "$DEST/one.npz" "$DEST/ranks.npz" \
            >"$DEST/compare.log" 2>&1; then
        ok "$N GPU ranks == one GPU on the combined batch ($(tail -1 "$DEST/compare.log"))"
    else
        fail "$N GPU ranks == one GPU (see one.log, equal.rank*.log, compare.log)"
    fi

    # 5. unequal batches
    if timeout 300 python3 tests/dist_worker.py steps "$DEST/one_u.npz" $((4 * N)) \
        $((4 * N - 2)) paper cuda >"$DEST/one_u.log" 2>&1 &&
        ranks "$N" unequal python3 tests/dist_worker.py steps "$DEST/ranks_u.npz" 4 "$U" paper cuda &&
        python3 tests/dist_worker.py compare "$DEST/one_u.npz" "$DEST/ranks_u.npz" \
            >"$DEST/compare_u.log" 2>&1; then
        ok "$N GPU ranks with unequal batches ($(tail -1 "$DEST/compare_u.log"))"
    else
        fail "$N GPU ranks with unequal batches (see unequal.rank*.log, compare_u.log)"
    fi

    # 6. afire pretrain on N GPUs: checkpoint + resume == straight
    P=(python3 -m afire.cli pretrain --device cuda --phantoms 256 --epochs 2
        --batch-size $((8 * N)) --log-every 1 --quiet --no-report precision=fp32)
    if ranks "$N" straight "${P[@]}" --out /tmp/afire_dist_a --overwrite &&
        ranks "$N" split1 "${P[@]}" --out /tmp/afire_dist_b --overwrite --max-steps 5 &&
        ranks "$N" split2 "${P[@]}" --out /tmp/afire_dist_b --resume &&
        python3 tests/gpu/dist_resume_check.py /tmp/afire_dist_a /tmp/afire_dist_b \
            >"$DEST/resume.log" 2>&1; then
        ok "afire pretrain on $N GPUs, resume exact ($(tail -1 "$DEST/resume.log"))"
    else
        fail "afire pretrain on $N GPUs / resume (see straight.*, split*.*, resume.log)"
    fi

    # 7. a hung rank: rank 0 stops with the timeout error (the hung rank ends by `timeout`)
    t=$(date +%s)
    AFIRE_COMM_TIMEOUT=20 AFIRE_TEST_OUT=/tmp/afire_dist_hang AFIRE_TEST_DEVICE=cuda \
        RANK_TIMEOUT=90 ranks "$N" hang python3 tests/dist_worker.py die hang 2
    took=$(($(date +%s) - t))
    if grep -q "did not complete within 20 s" "$DEST/hang.rank0.log"; then
        ok "a hung rank: rank 0 stopped with the timeout error (all ended after $took s)"
    else
        fail "a hung rank (see hang.rank*.log; $took s)"
    fi

    # 8. under mpirun (the NCCL id through MPI), when the mpich wheel was given
    if [ -x /tmp/mpich/bin/mpirun ]; then
        if AFIRE_MPI_LIB=/tmp/mpich/lib/libmpi.so.12 timeout 300 /tmp/mpich/bin/mpirun \
            -np "$N" python3 tests/dist_worker.py steps "$DEST/ranks_mpi.npz" 4 "$W" paper cuda \
            >"$DEST/mpirun.log" 2>&1 &&
            python3 tests/dist_worker.py compare "$DEST/one.npz" "$DEST/ranks_mpi.npz" \
                >>"$DEST/mpirun.log" 2>&1; then
            ok "mpirun -np $N on GPUs == one GPU ($(tail -1 "$DEST/mpirun.log"))"
        else
            fail "mpirun -np $N on GPUs (see mpirun.log)"
        fi
    else
        note "skip  mpirun on GPUs (no .whl/mpich-*.whl)"
    fi

    # 9. scaling: vit_base bf16, 64 images per GPU, 1 GPU vs N GPUs, overlap on and off
    BENCH=(python3 benchmarks/bench_gpu_dist.py --preset vit_base --batch 64 --steps 10
        --warmup 3)
    if timeout 200 "${BENCH[@]}" --out "$DEST/bench_1gpu.json" >"$DEST/bench_1gpu.log" 2>&1 &&
        ranks "$N" bench "${BENCH[@]}" --out "$DEST/bench_${N}gpu.json" &&
        AFIRE_NCCL_OVERLAP=0 ranks "$N" bench_noov "${BENCH[@]}" \
            --out "$DEST/bench_${N}gpu_no_overlap.json"; then
        ok "scaling: $(python3 -c "
import json
a, b, c = (json.load(open('$DEST/' + f)) for f in
           ('bench_1gpu.json', 'bench_${N}gpu.json', 'bench_${N}gpu_no_overlap.json'))
print('1 GPU %.1f ms, $N GPUs %.1f ms (efficiency %.3f), without overlap %.1f ms' % (
      a['step_ms_median'], b['step_ms_median'], a['step_ms_median'] / b['step_ms_median'],
      c['step_ms_median']))")"
    else
        fail "scaling benchmark (see bench_*.log)"
    fi
fi

note "total $(($(date +%s) - T0)) s"
if [ "${#failed[@]}" -gt 0 ]; then
    note "FAILED: ${failed[*]}"
    exit 1
fi
note "all data-parallel checks passed"
