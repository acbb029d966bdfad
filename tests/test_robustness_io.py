"""Hostile save targets, overflowing anomaly scores, bad device strings, `afire --version`.

Saves: a target that is not a regular file (a device such as /dev/full, a directory, a FIFO,
a socket, a link to any of these or to nothing) is refused before anything is written and is
still what it was afterwards; a failed write (file-size limit, read-only file system) raises
an OSError naming the path and the reason and leaves the previous file and no temporary file.
Anomaly scores: finite at 224-px-sized errors, ranked exactly like the paper's 1/A(x).
"""
import errno
import math
import os
import socket
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _util import phantom_like, small_cfg
from afire import AFiRe, _C, cuda_available, require_device
from afire.cli import describe_os_error, main

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARR = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}


@pytest.fixture(scope="module")
def model():
    m = AFiRe(small_cfg(), steps_per_epoch=2)
    m.train_step(phantom_like(4))
    return m


def temp_files(d):
    return [f for f in os.listdir(d) if ".tmp." in f]


def assert_one_line_naming(e, path, *words):
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    line = describe_os_error(e.value)     # what the CLI prints: path once, no "[Errno"
    assert "[Errno" not in line and line.count(str(path)) >= 1


# ---------------------------------------------------------------------- refused targets

@pytest.fixture
def full_device(tmp_path):
    """A private twin of /dev/full (char device 1:7) to aim saves at: a regression then
    replaces this node, never the system's /dev/full. Needs root (CAP_MKNOD)."""
    node = tmp_path / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here: {e}")
    return node


def test_device_node_is_refused_and_stays_a_device(model, full_device):
    """The /dev/full report: save returned success and replaced the node with a file."""
    before = os.lstat(full_device)
    with pytest.raises(FileExistsError) as e:
        model.save(full_device)
    assert_one_line_naming(e, full_device, "character device", "not a regular file")
    with pytest.raises(FileExistsError):
        model.export_backbone(full_device)
    with pytest.raises(FileExistsError):
        _C.io.save_safetensors(full_device, ARR)
    after = os.lstat(full_device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino
    assert temp_files(full_device.parent) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_link_to_dev_full_is_refused(model, tmp_path):
    """Aimed at the real /dev/full through a link: a regression would replace the link
    (in tmp_path), not the device."""
    link = tmp_path / "ckpt.safetensors"
    link.symlink_to("/dev/full")
    with pytest.raises(FileExistsError) as e:
        model.save(link)
    assert_one_line_naming(e, link, "symbolic link to a character device")
    assert link.is_symlink() and os.readlink(link) == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert temp_files(tmp_path) == []


def test_directory_target_is_refused(model, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with pytest.raises(IsADirectoryError) as e:
        model.save(d)
    assert_one_line_naming(e, d, "directory")
    assert d.is_dir() and (d / "keep.txt").read_text() == "mine"
    assert temp_files(tmp_path) == [] and temp_files(d) == []


def test_fifo_target_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for writing would block until a reader comes: refused from lstat."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path[:0] = [{ROOT!r}]
        from afire import _C
        try:
            _C.io.save_safetensors({str(fifo)!r}, {{"a": np.zeros(2, np.float32)}})
        except OSError as e:
            print(type(e).__name__, e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "FileExistsError" in r.stdout and "FIFO" in r.stdout, r.stdout
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert temp_files(tmp_path) == []


def test_socket_target_is_refused(tmp_path):
    path = tmp_path / "s"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for a unix socket")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        with pytest.raises(FileExistsError, match="socket"):
            _C.io.save_safetensors(path, ARR)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        s.close()


def test_dangling_link_is_refused(model, tmp_path):
    link = tmp_path / "c.safetensors"
    link.symlink_to(tmp_path / "nowhere" / "x.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        model.save(link)
    assert_one_line_naming(e, link, "symbolic link to a missing file")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_link_to_a_regular_file_replaces_the_file_and_keeps_the_link(model, tmp_path):
    real = tmp_path / "real.safetensors"
    _C.io.save_safetensors(real, ARR)
    link = tmp_path / "last.safetensors"
    link.symlink_to(real.name)                   # relative, as users make them
    model.save(link)
    assert link.is_symlink() and os.readlink(link) == real.name
    back = AFiRe.load(real)
    np.testing.assert_array_equal(back.encode(phantom_like(1)), model.encode(phantom_like(1)))
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------------- failed writes

def test_read_only_file_system_is_a_clear_error(model, tmp_path):
    """A read-only mount refuses even root, unlike chmod; skipped where mount is not allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()}")
    try:
        p = mnt / "c.safetensors"
        with pytest.raises(OSError) as e:
            model.save(p)
        assert e.value.errno == errno.EROFS
        assert_one_line_naming(e, p, "Read-only file system")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_read_only_directory_is_a_permission_error(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("directory permissions do not apply (running as root)")
        with pytest.raises(PermissionError) as e:
            model.save(ro / "c.safetensors")
        assert_one_line_naming(e, ro / "c.safetensors", "Permission denied")
        with pytest.raises(PermissionError):
            model.save(ro / "sub" / "c.safetensors")   # cannot create the parent either
    finally:
        ro.chmod(0o700)


WRITE_CHILD = textwrap.dedent("""
    import resource, signal, sys, numpy as np
    sys.path[:0] = [{root!r}]
    from afire import _C
    big = {{"w": np.ones(1 << 16, np.float32)}}
    # SIGXFSZ ignored: a write past the limit then fails with EFBIG instead of killing us
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        _C.io.save_safetensors(sys.argv[1], big)
    except OSError as e:
        print(e.errno, e.strerror)
        sys.exit(3)
""")


def test_failed_write_is_reported_and_changes_nothing(tmp_path):
    """A write that fails half-way (EFBIG under RLIMIT_FSIZE, as ENOSPC would) raises; the
    old file is untouched and the temporary file removed."""
    p = tmp_path / "c.safetensors"
    _C.io.save_safetensors(p, ARR)
    before = p.read_bytes()
    r = subprocess.run([sys.executable, "-c", WRITE_CHILD.format(root=ROOT), str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    code, msg = r.stdout.split(" ", 1)
    assert int(code) == errno.EFBIG
    assert f"cannot write '{p}'" in msg and "unchanged" in msg
    assert p.read_bytes() == before and temp_files(tmp_path) == []


def test_cli_prints_one_line_for_an_unwritable_output(tmp_path, capsys):
    """An OSError reaching the CLI is one line with the path, exit status 2, no traceback."""
    (tmp_path / "afile").write_text("x")
    rc = main(["prepare", "2", str(tmp_path / "afile" / "out"), "--format", "phantom",
               "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("afire prepare: error:"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "afile" in err


# ---------------------------------------------------------------------- anomaly score

def logmeanexp(e):
    """The float64 reference of log(1/A(x)) = log((1/L) sum_j exp(e_j)), per row."""
    return np.logaddexp.reduce(e, axis=-1) - np.log(e.shape[-1])


def test_c_anomaly_log_score_is_finite_and_ranked_like_the_paper():
    """Errors of ~1000 (what 224-px restorations give): 1/A(x) overflows, its log does not,
    and the order equals the float64 log-space reference, which differs from the order by
    mean or by max error (so it really is a log-mean-exp)."""
    L = 16
    e = np.zeros((5, L))
    e[0, 0] = 1000.0                 # one bad token
    e[1, :2] = 999.5                 # two slightly less bad: log 2 ahead of e[0]
    e[2, :] = 990.0                  # all bad, highest mean, but lowest log score of these
    e[3, :2] = 1000.0, 990.0         # e[0] plus exp(-10) of it: just above e[0]
    e[4, :] = np.linspace(700, 1020, L)
    y = np.sqrt(e).astype(np.float32)[..., None]  # PPC = 1, x = 0: err = y^2
    x = np.zeros_like(y)
    score, log_score, err = _C.objective.anomaly_score(y, x)
    ref = logmeanexp(err)
    assert np.isfinite(log_score).all() and np.isinf(score[:4]).all()
    np.testing.assert_allclose(log_score, ref, rtol=1e-13)
    assert list(np.argsort(log_score, kind="stable")) == list(np.argsort(ref, kind="stable"))
    assert log_score[1] > log_score[0] and log_score[3] > log_score[0]
    assert log_score[2] < log_score[0] and err[2].mean() > err[0].mean()


@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU visible: the CUDA twin is "
                    "checked on a GPU machine")
def test_cuda_anomaly_log_score_matches_the_reference_at_224px():  # pragma: no cover
    from afire import cuda
    rng = np.random.default_rng(3)
    y = rng.normal(0, 1.2, (6, 196, 256)).astype(np.float32)   # e_j ~ 700..1100
    x = np.zeros_like(y)
    score, log_score, err = cuda.anomaly_score(y, x)
    assert np.isfinite(log_score).all()
    np.testing.assert_allclose(log_score, logmeanexp(err), rtol=1e-12)


def test_model_anomaly_score_is_finite_where_the_paper_value_overflows(model):
    """Scale the restoration head so that the patch errors are huge: `anomaly_score` stays
    finite, equals the log-space reference of its own error map and `anomaly_log_score`;
    ``log=False`` gives the paper's raw value, which overflows."""
    st = model.state_tensors()
    w = st["student.decoder.decoder_pred.weight"] * 1e4
    m = AFiRe(model.cfg, steps_per_epoch=2)
    m.set_state_tensors(dict(st, **{"student.decoder.decoder_pred.weight": w}))
    x = phantom_like(6, seed=4)
    s, err = m.anomaly_score(x, return_map=True)
    assert s.shape == (6,) and s.dtype == np.float64 and np.isfinite(s).all()
    assert err.min() > 1000                      # well past exp's float64 range
    np.testing.assert_allclose(s, logmeanexp(err.reshape(6, -1)), rtol=1e-12)
    np.testing.assert_array_equal(s, m.anomaly_log_score(x))
    raw = m.anomaly_score(x, log=False)
    assert np.isinf(raw).all()
    # where the paper value fits, it is exp of the returned score
    small = model.anomaly_score(x, log=False)
    np.testing.assert_allclose(np.log(small), model.anomaly_score(x), rtol=1e-12)
    assert math.isfinite(float(small.max()))


# ---------------------------------------------------------------------- device, version

@pytest.mark.parametrize("bad", ["cuda:x", "cuda:", "cuda:-1", "cuda: 1", "cuda:1.0",
                                 "gpu", "CUDA", "cuda:١"])
def test_malformed_device_strings_get_one_clear_message(bad):
    with pytest.raises(ValueError) as e:
        require_device(bad)
    assert str(e.value) == ("device must be 'cpu', 'cuda' or 'cuda:N' (N an integer), "
                            f"got {bad!r}")
    with pytest.raises(ValueError, match="cuda:N"):
        AFiRe(small_cfg(), device=bad)


def test_version_flag_prints_the_package_version(capsys):
    import afire
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"afire {afire.__version__}"
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == afire.__version__
