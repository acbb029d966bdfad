"""valgrind memcheck over a short train / save / load / inference run of the CPU extension.

    python3 tools/valgrind_check.py [--keep-log PATH]

Runs a child CPython under ``valgrind --tool=memcheck`` with PYTHONMALLOC=malloc (so
CPython's small-object allocator, which reads memory it never wrote by design, is replaced
by plain malloc that memcheck understands) and the suppressions in tools/valgrind.supp for
the remaining noise outside afire (the dynamic loader, OpenBLAS's CPU probing and buffer
reuse, libgomp's thread pool). Every error report is attributed: one whose stack has a
frame in afire's extension (afire/_C*.so) fails the check; others are printed as
"unattributed" for review. Leak checking is off: the interpreter frees nothing at exit.
Exit status 0 = no error in afire's code.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOAD = r'''
import os, sys, tempfile
import numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from _util import phantom_like, small_cfg
from afire import AFiRe, _C
for objective in ("paper", "released"):
    m = AFiRe(small_cfg(objective=objective, batch_size=2), steps_per_epoch=2)
    for i in range(2):
        m.train_step(phantom_like(2, seed=i))
    d = tempfile.mkdtemp()
    p = os.path.join(d, "c.safetensors")
    m.save(p)
    back = AFiRe.load(p)
    x = phantom_like(3, seed=9)
    assert np.array_equal(back.encode(x), m.encode(x))
    back.anomaly_score(x)
    back.restore(x, token_mask=np.ones((3, m.num_patches), np.uint8))
    try:
        _C.io.load_safetensors(__file__)  # a malformed file: the error path
    except ValueError:
        pass
    os.unlink(p)
    os.rmdir(d)
print("workload done")
'''


def frames_of(block: list[str]) -> list[str]:
    return [ln for ln in block if re.search(r"(at|by) 0x[0-9A-F]+:", ln)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-log", help="also write valgrind's full log here")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not installed: skipped")
        return 0
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "workload.py")
        with open(script, "w") as f:
            f.write(WORKLOAD.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
        log = os.path.join(d, "vg.log")
        env = dict(os.environ, PYTHONMALLOC="malloc", OMP_NUM_THREADS="2",
                   OMP_WAIT_POLICY="passive",  # valgrind runs one thread at a time: no spinning
                   OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
        cmd = ["valgrind", "--tool=memcheck", "--leak-check=no", "--error-limit=no",
               "--num-callers=40", f"--suppressions={os.path.join(ROOT, 'tools', 'valgrind.supp')}",
               f"--log-file={log}", sys.executable, script]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        text = open(log).read()
        if args.keep_log:
            shutil.copy(log, args.keep_log)
    if r.returncode != 0 or "workload done" not in r.stdout:
        print(r.stdout[-2000:], r.stderr[-4000:], text[-4000:], sep="\n")
        print("valgrind_check: the workload failed")
        return 1
    # error blocks: consecutive '==pid== ' lines after a line that starts a report
    blocks, cur = [], None
    for ln in text.splitlines():
        body = re.sub(r"^==\d+== ?", "", ln)
        if cur is None and re.match(r"(Invalid|Conditional|Use of uninit|Syscall param|"
                                    r"Mismatched|Source and destination|Argument)", body):
            cur = [body]
        elif cur is not None:
            if body.strip() == "":
                blocks.append(cur)
                cur = None
            else:
                cur.append(body)
    if cur:
        blocks.append(cur)
    ours = [b for b in blocks if any("afire/_C" in f or "/csrc/" in f for f in frames_of(b))]
    other = [b for b in blocks if b not in ours]
    m = re.search(r"ERROR SUMMARY: (\d+) errors from (\d+) contexts \(suppressed: (\d+) from (\d+)\)",
                  text)
    summary = m.group(0) if m else "ERROR SUMMARY not found"
    print(f"valgrind memcheck: {summary}")
    print(f"  error reports in afire's code: {len(ours)}; unattributed: {len(other)}")
    for b in ours + other:
        print("\n".join(("  [afire] " if b in ours else "  [other] ") + ln for ln in b[:25]))
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
