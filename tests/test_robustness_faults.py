"""Injected faults: a checkpoint write that fails (file-size limit, full disk, a killed
process, an unusable target) leaves the previous checkpoint intact and loadable, and a
non-finite loss leaves the model bit-identical (so a loop never saves a diverged state)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def trained(steps=1, seed=0):
    m = AFiRe(small_cfg(seed=seed), steps_per_epoch=2)
    for i in range(steps):
        m.train_step(phantom_like(4, seed=i))
    return m


def state_bytes(m):
    return {k: v.tobytes() for k, v in m.state_tensors().items()}


def assert_is_checkpoint_of(path, model):
    back = AFiRe.load(path)
    assert back.step == model.step
    assert state_bytes(back) == state_bytes(model)


def no_temp_files(d):
    return [f for f in os.listdir(d) if ".tmp." in f] == []


# A child process: build the same model as `trained(1)`, train one more step, then save to
# argv[1] under the fault set up by the snippet; exits 0 if the save succeeded, 3 on OSError.
CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from _util import phantom_like, small_cfg
    from afire import AFiRe
    m = AFiRe(small_cfg(), steps_per_epoch=2)
    for i in range(2):
        m.train_step(phantom_like(4, seed=i))
    {fault}
    try:
        m.save(sys.argv[1])
    except OSError as e:
        print(type(e).__name__, e.errno, e)
        sys.exit(3)
""")


def run_child(path, fault, **kw):
    code = CHILD.format(root=ROOT, tests=HERE, fault=fault)
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120, **kw)


def test_write_cut_short_by_file_size_limit_keeps_previous(tmp_path):
    m = trained(1)
    p = tmp_path / "c.safetensors"
    m.save(p)
    before = p.read_bytes()
    # RLIMIT_FSIZE applies to root too; with SIGXFSZ ignored the write fails with EFBIG
    limit = len(before) // 2
    r = run_child(p, f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                     f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "EFBIG" in r.stdout or " 27 " in r.stdout, r.stdout
    assert p.read_bytes() == before
    assert_is_checkpoint_of(p, m)
    assert no_temp_files(tmp_path)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A tmpfs just big enough for one checkpoint (needs root / CAP_SYS_ADMIN)."""
    size = os.path.getsize(_one_checkpoint(tmp_path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kib = (size * 3 // 2) // 1024 + 1
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _one_checkpoint(d):
    p = d / "probe.safetensors"
    trained(1).save(p)
    return p


def test_full_disk_keeps_previous(tiny_tmpfs):
    m = trained(1)
    p = tiny_tmpfs / "c.safetensors"
    m.save(p)  # fits
    before = p.read_bytes()
    m2 = trained(2)
    with pytest.raises(OSError) as e:
        m2.save(p)  # the temporary copy does not fit beside the old file
    assert e.value.errno == 28  # ENOSPC
    assert p.read_bytes() == before
    assert_is_checkpoint_of(p, m)
    assert no_temp_files(tiny_tmpfs)
    p.unlink()  # with room again, the same save succeeds
    m2.save(p)
    assert_is_checkpoint_of(p, m2)


def test_unusable_targets_raise_oserror_and_keep_previous(tmp_path):
    m = trained(1)
    p = tmp_path / "c.safetensors"
    m.save(p)
    before = p.read_bytes()
    m2 = trained(2)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError):
        m2.save(tmp_path / "adir")           # rename onto a directory
    with pytest.raises(NotADirectoryError):
        m2.save(p / "c.safetensors")         # parent is a file
    m2.save(tmp_path / "missing" / "c.safetensors")   # missing parents are created
    assert_is_checkpoint_of(tmp_path / "missing" / "c.safetensors", m2)
    assert p.read_bytes() == before and no_temp_files(tmp_path)
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError):
                m2.save(ro / "c.safetensors")
        finally:
            ro.chmod(0o700)


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    p = tmp_path / "c.safetensors"
    m = trained(1)
    m.save(p)
    states = {m.step: state_bytes(m)}
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{ROOT!r}, {HERE!r}]
        from _util import phantom_like, small_cfg
        from afire import AFiRe
        m = AFiRe(small_cfg(), steps_per_epoch=2)
        m.train_step(phantom_like(4, seed=0))
        print("ready", flush=True)
        i = 1
        while True:                    # save, step, save, ... until killed
            m.save(sys.argv[1])
            m.train_step(phantom_like(4, seed=i))
            i += 1
    """)
    rng = np.random.default_rng(0)
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code, str(p)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.1 * rng.random())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        back = AFiRe.load(p)  # never a torn file: rename is atomic
        ref = trained(back.step) if back.step not in states else None
        if ref is not None:
            states[back.step] = state_bytes(ref)
        assert state_bytes(back) == states[back.step], f"trial {trial}: step {back.step}"
    # a kill between create and rename can leave a temporary file; it never shadows the
    # checkpoint and later saves use fresh names (pid + counter)
    leftovers = [f for f in os.listdir(tmp_path) if ".tmp." in f]
    for f in leftovers:
        assert f.startswith("c.safetensors.tmp.")
    trained(1).save(p)


@pytest.mark.parametrize("poison", [np.nan, np.inf, 1e30])
def test_non_finite_loss_leaves_the_model_bit_identical(poison):
    m = trained(1)
    views = m.state_tensors()
    w = views["student.decoder.decoder_pred.weight"]
    w.flat[0] = poison
    before = state_bytes(m)
    step, protos_set = m.step, m._t.prototypes_set
    with pytest.raises(FloatingPointError, match="not updated"):
        m.train_step(phantom_like(4, seed=5))
    assert m.step == step and m._t.prototypes_set == protos_set
    assert state_bytes(m) == before  # params, teacher, moments, prototypes: every bit
    # so a loop that saves only after a successful step never writes the diverged state,
    # and loading such a state is refused
    w.flat[0] = 0.0
    m.train_step(phantom_like(4, seed=5))
    assert m.step == step + 1


def test_load_refuses_non_finite_state(tmp_path):
    m = trained(1)
    m.state_tensors()["adam_v.encoder.cls_token"].flat[0] = np.inf
    p = tmp_path / "c.safetensors"
    m.save(p)  # the writer stores what it is given ...
    with pytest.raises(ValueError, match="NaN or Inf"):
        AFiRe.load(p)  # ... the loader refuses it
