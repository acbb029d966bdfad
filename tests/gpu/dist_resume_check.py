"""run_dist_checks.sh step 6: two `afire pretrain` runs (straight; split by a checkpoint and
a resume) log the same rows and end with bit-identical checkpoints; the checkpoint loads on
the CPU.   python tests/gpu/dist_resume_check.py RUN_A RUN_B"""
import json
import os
import sys

import numpy as np

from afire import _C, AFiRe


def rows(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        out = [json.loads(line) for line in f]
    for r in out:
        r.pop("time"), r.pop("images_per_s")
    return out


a, b = sys.argv[1], sys.argv[2]
assert rows(a) == rows(b), "the logs differ"
ta = _C.io.load_safetensors(os.path.join(a, "last.safetensors"))[0]
tb = _C.io.load_safetensors(os.path.join(b, "last.safetensors"))[0]
assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta), "states differ"
step = AFiRe.load(os.path.join(a, "last.safetensors")).step
print(f"resume bit-identical over {len(rows(a))} steps; the checkpoint (step {step}) loads on "
      "the cpu")
