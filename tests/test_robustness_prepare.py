"""`afire prepare` against hostile inputs and environments: it must finish or stop with one
line and exit status 2, never hang, never try to allocate gigabytes for a tiny file.

* the default (several) workers after the parent ran OpenMP code (the phantom hang);
* a 225-byte 1 x 150000 PNG (crop mode would have resized it to 224 x 33.6 M pixels), a
  header that declares more pixels than the limit, Pillow's decompression-bomb limit;
* --size far above the maximum, an empty folder, a folder of unreadable files;
* a FIFO and a link to /dev/zero named like images;
* an output path that is a file, under a file, read-only, on a full disk (/dev/full);
* a worker process that dies.
Subprocesses run under a timeout, so a regression fails instead of hanging the suite."""
import errno
import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from data_fakes import gradient, write_corrupt, write_png
from PIL import Image

from afire.cli import main
from afire.data import phantom_dataset
from afire.data.image import MAX_PIXELS, ImageTooLargeError, load_gray, resize_square

# `afire.data.prepare` is also the name of the function that afire.data exports
prep = importlib.import_module("afire.data.prepare")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANCZOS = Image.Resampling.LANCZOS


def bounded(cmd, timeout, env=None, cwd=REPO, preexec_fn=None):
    """Run cmd in its own process group; past the timeout kill the whole group (a hung
    pool's workers too) and fail."""
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=e, cwd=str(cwd), start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... did not finish in {timeout} s (hung)")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def cli(args, timeout=30, limit_bytes=None, env=None):
    """`afire prepare ARGS --quiet` in a fresh interpreter, with a timeout (and optionally an
    address-space limit, so that a huge allocation fails fast instead of swapping)."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    # AddressSanitizer reserves terabytes of shadow address space at start, so under the
    # sanitized suite (.ci/sanitize.sh preloads libasan) the limit is left off; the refusal
    # itself is still checked there
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        limit_bytes = None
    return bounded([sys.executable, "-m", "afire.cli", "prepare", *args, "--quiet"],
                   timeout, env=env, preexec_fn=limit if limit_bytes else None)


def python(code, cwd, timeout=30):
    """Python code in a fresh interpreter, with a timeout."""
    return bounded([sys.executable, "-c", code], timeout, cwd=cwd)


def run(args, capsys):
    rc = main(["prepare", *args, "--quiet"])
    return rc, capsys.readouterr().err


def one_line_error(err):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afire prepare: error: "), err
    return lines[0]


def shard_rows(out):
    """{manifest path: shard row} read with np.load, not with the library's loader."""
    rows = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    shards = {}
    got = {}
    for r in rows:
        k = r["shard"]
        if k not in shards:
            shards[k] = np.load(os.path.join(out, f"shard_{k:05d}.npy"))
        got[r["path"]] = shards[k][r["row"]]
    return rows, got


def thin_png(path, width=150000):
    """A 1 x width all-black 8-bit PNG: a couple of hundred bytes."""
    Image.fromarray(np.zeros((1, width), np.uint8)).save(path, optimize=True)
    return path


def png_header_only(path, w, h):
    """A PNG whose IHDR declares w x h 8-bit gray pixels, with a tiny IDAT: decoding it would
    fail (or allocate w*h bytes); the header alone must be enough to refuse it."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- the hang (issue 12, item 2)


@pytest.mark.parametrize("workers", [None, "3"])
def test_phantom_with_default_and_several_workers_finishes(tmp_path, workers):
    # the CLI drew the phantom labels with OpenMP in the parent, then forked a Pool whose
    # workers' first OpenMP region waited forever (futex_wait, 0% CPU)
    out = str(tmp_path / "ph")
    args = ["12", out, "--format", "phantom", "--size", "32", "--shard-size", "5",
            "--seed", "1", "--p-abnormal", "0.5"] + (["--workers", workers] if workers else [])
    p = cli(args)
    assert p.returncode == 0, p.stderr
    assert "12 images in 3 shards" in p.stderr
    ref = phantom_dataset(12, size=32, seed=1, p_abnormal=0.5)
    rows, got = shard_rows(out)
    assert [r["subject"] for r in rows] == list(range(12))
    for r in rows:
        np.testing.assert_array_equal(got[r["path"]], ref["images"][r["subject"]])
    masks = np.concatenate([np.load(os.path.join(out, f"mask_{k:05d}.npy")) for k in range(3)])
    np.testing.assert_array_equal(masks, ref["lesion_masks"])


def test_workers_are_not_forked_from_an_openmp_parent(tmp_path):
    # the pool's processes must not inherit a parent whose libgomp thread pool exists: run
    # OpenMP code in the parent, then OpenMP code in a worker of the pool prepare uses
    code = """if True:
        from concurrent.futures import ProcessPoolExecutor
        import numpy as np
        from afire.data import phantom_dataset, phantom_records
        import importlib
        prep = importlib.import_module("afire.data.prepare")
        ref = phantom_dataset(6, size=16, seed=4)          # OpenMP threads exist now
        ctx = prep._pool_context()
        assert ctx.get_start_method() != "fork", ctx.get_start_method()
        recs = phantom_records(6, seed=4)
        tasks = [((0, i), r.path, 16, "crop", None, True, None) for i, r in enumerate(recs)]
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            got = ex.submit(prep._phantom_chunk, tasks).result(timeout=20)
        np.testing.assert_array_equal(np.stack([g[1] for g in got]), ref["images"])
        print("ok")
    """
    p = python(code, tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_mixed_phantom_and_files_with_workers_match_serial(tmp_path):
    # in a subprocess with a timeout: with a forked pool this hung (pytest itself has run
    # OpenMP code by now), and a hang must fail the test, not stop the suite
    src = tmp_path / "src"
    for i in range(9):
        write_png(str(src / f"im{i}.png"), gradient(20 + i, 30, i))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    code = f"""if True:
        import importlib
        prep = importlib.import_module("afire.data.prepare")
        files = prep.read_dataset("folder", {str(src)!r})
        ph = prep.phantom_records(5, seed=2)
        recs = ph[:3] + files[:4] + ph[3:] + files[4:]
        for out, workers in (({a!r}, 1), ({b!r}, 2)):
            s = prep.prepare("", out, fmt="folder", size=16, workers=workers, shard_size=4,
                             progress=False, records=recs)
            assert s["images"] == 14 and s["failed"] == 0, s
        print("ok")
    """
    p = python(code, tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    for k in range(4):
        np.testing.assert_array_equal(np.load(os.path.join(a, f"shard_{k:05d}.npy")),
                                      np.load(os.path.join(b, f"shard_{k:05d}.npy")))
    rows, got = shard_rows(b)
    assert len(rows) == 14
    ref = phantom_dataset(5, size=16, seed=2)["images"]
    for r in rows:
        if r["path"].startswith("phantom://"):
            np.testing.assert_array_equal(got[r["path"]], ref[r["subject"]])
        else:  # an independent Pillow decode: short side 20+i..28 -> 16, centre crop
            with Image.open(r["path"]) as im:
                w, h = im.size
                nw, nh = round(w * 16 / min(w, h)), round(h * 16 / min(w, h))
                x = np.asarray(im.convert("L").resize((nw, nh), LANCZOS))
            top, left = (nh - 16) // 2, (nw - 16) // 2
            np.testing.assert_array_equal(got[r["path"]], x[top:top + 16, left:left + 16])


def test_dead_worker_is_an_error_not_a_hang():
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:
        def submit(self, fn, tasks):
            f = Future()
            f.set_exception(BrokenProcessPool("a worker died"))
            return f

    tasks = [((0, 0), "/data/x.png", 16, "crop", None, True, None)]
    with pytest.raises(prep.PrepareError, match=r"worker process died .*x\.png.*--workers 1"
                                                r".*__name__ == \"__main__\""):
        list(prep._ordered_results([("file", tasks)], DeadPool(), window=2))


# ---------------------------------------------------------------- sizes (issue 12, item 3)


def test_size_is_bounded(tmp_path, capsys):
    # the only source file is unreadable: if the check regressed, nothing would be resized
    # to 100000 x 100000 (10 GB) in this process
    write_corrupt(str(tmp_path / "src" / "a.png"))
    rc, err = run([str(tmp_path / "src"), str(tmp_path / "o"), "--size", "100000"], capsys)
    assert rc == 2 and "--size" in one_line_error(err) and "4096" in err
    assert not (tmp_path / "o").exists()
    rc, err = run(["3", str(tmp_path / "p"), "--format", "phantom", "--size", "4096"], capsys)
    assert rc == 2 and "--shard-size 256" in one_line_error(err)  # 16 GiB of shard in RAM
    rc, err = run(["3", str(tmp_path / "p"), "--format", "phantom", "--size", "7"], capsys)
    assert rc == 2 and "from 8 to 4096" in one_line_error(err)


def test_thin_png_is_refused_without_a_huge_allocation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    thin = thin_png(str(src / "thin.png"))
    assert os.path.getsize(thin) < 1000
    write_png(str(src / "ok.png"), gradient(20, 30, 1))
    out = str(tmp_path / "out")
    # 2 GiB of address space: the 7.5 GB intermediate of the old crop resize cannot happen
    # quietly here; the refusal must come from the size check, not from a MemoryError
    p = cli([str(src), out, "--size", "224", "--workers", "1"], timeout=60,
            limit_bytes=2 << 30, env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "1 images in 1 shards" in p.stderr and "1 unreadable" in p.stderr
    errors = open(os.path.join(out, "errors.txt")).read().splitlines()
    assert len(errors) == 1 and errors[0].startswith(thin + "\tImageTooLargeError: ")
    assert "150000x1" in errors[0] and "--resize pad" in errors[0]
    assert "MemoryError" not in p.stderr
    # pad mode keeps the whole strip: long side to 224, one row high, black padding
    out2 = str(tmp_path / "pad")
    p = cli([str(src), out2, "--size", "224", "--workers", "1", "--resize", "pad"],
            timeout=60, limit_bytes=2 << 30,
            env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert p.returncode == 0 and "2 images" in p.stderr, p.stderr
    rows, got = shard_rows(out2)
    assert not got[thin].any()


def test_declared_pixels_are_checked_before_decoding(tmp_path):
    # 9000 x 9000 = 81 M pixels (> 2**26) with a 64-byte IDAT: refused from the header
    big = png_header_only(str(tmp_path / "big.png"), 9000, 9000)
    with pytest.raises(ImageTooLargeError, match=r"big\.png: image is 9000x9000 = "
                                                 r"81,000,000 pixels, above the limit"):
        load_gray(big)
    # above Pillow's own decompression-bomb limit: the same kind of error, file named
    bomb = png_header_only(str(tmp_path / "bomb.png"), 100000, 100000)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: refused before decoding"):
        load_gray(bomb)
    # the limit is a parameter (None: ours is off) and the decoder is only reached below it
    with pytest.raises(ImageTooLargeError):
        load_gray(write_png(str(tmp_path / "s.png"), gradient(20, 30)), max_pixels=599)
    assert load_gray(str(tmp_path / "s.png"), max_pixels=600).shape == (20, 30)
    with pytest.raises(Exception) as e:  # past our limit the decoder meets the short data
        load_gray(big, max_pixels=None)
    assert not isinstance(e.value, ImageTooLargeError)
    assert MAX_PIXELS == 1 << 26


def test_refused_files_go_to_errors_txt_and_the_run_goes_on(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    png_header_only(str(src / "a_big.png"), 9000, 9000)
    write_png(str(src / "b.png"), gradient(20, 30, 2))
    out = str(tmp_path / "out")
    rc, err = run([str(src), out, "--size", "16", "--workers", "1"], capsys)
    assert rc == 0 and "1 images" in err and "1 unreadable" in err
    line = open(os.path.join(out, "errors.txt")).read()
    assert line.startswith(str(src / "a_big.png") + "\tImageTooLargeError: ")
    assert "9000x9000" in line
    # a smaller limit through the library refuses the other file too; another limit is
    # another preparation, so the finished shard is redone, not reused
    with pytest.raises(prep.PrepareError, match="none of the 2 files could be read"):
        prep.prepare(str(src), out, size=16, workers=1, progress=False, max_pixels=100)


def test_resize_intermediate_is_bounded():
    # small enough to stay cheap if the check ever regresses (64 x 1.28 M = 82 MB); the
    # 1 x 150000 case runs under an address-space limit in the test above
    with pytest.raises(ImageTooLargeError, match=r"20000x1 .*1280000x64 = 81,920,000 "
                                                 r"pixels before the crop.*'pad'"):
        resize_square(np.zeros((1, 20000), np.uint8), 64, "crop", max_pixels=10**6)
    out = resize_square(np.full((1, 20000), 9, np.uint8), 64, "pad", max_pixels=10**6)
    assert out.shape == (64, 64) and (out[31] == 9).all() and out.sum() == 9 * 64
    # ordinary aspect ratios at the largest size are fine with the default limit
    assert resize_square(np.zeros((30, 60), np.uint8), 4096, "crop").shape == (4096, 4096)


# ---------------------------------------------------------------- inputs and outputs


def test_empty_and_unreadable_sources_are_errors(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    rc, err = run([str(tmp_path / "empty"), str(tmp_path / "o")], capsys)
    assert rc == 2 and "no .png/.jpg/.jpeg/.dcm/.dicom files" in one_line_error(err)
    assert not (tmp_path / "o").exists()
    rc, err = run(["0", str(tmp_path / "o"), "--format", "phantom"], capsys)
    assert rc == 2 and "nothing to prepare" in one_line_error(err)
    for i in range(3):
        write_corrupt(str(tmp_path / "bad" / f"x{i}.png"))
    rc, err = run([str(tmp_path / "bad"), str(tmp_path / "o"), "--workers", "1"], capsys)
    assert rc == 2 and "none of the 3 files could be read" in err and "Traceback" not in err
    assert len(open(tmp_path / "o" / "errors.txt").read().splitlines()) == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_fifo_and_devices_named_like_images_are_not_opened(tmp_path):
    # open() of a FIFO blocks until a writer comes: this hung before (subprocess+timeout)
    src = tmp_path / "src"
    write_png(str(src / "a.png"), gradient(20, 30, 1))
    os.mkfifo(src / "b.png")
    os.symlink("/dev/zero", src / "c.png")
    out = str(tmp_path / "out")
    p = cli([str(src), out, "--size", "16", "--workers", "1"], timeout=30)
    assert p.returncode == 0 and "1 images" in p.stderr and "2 unreadable" in p.stderr
    errors = open(os.path.join(out, "errors.txt")).read().splitlines()
    assert [e.split("\t")[0] for e in errors] == [str(src / "b.png"), str(src / "c.png")]
    assert "a FIFO, not a regular file" in errors[0] and "a device" in errors[1]


def test_output_is_a_file_or_under_a_file(tmp_path, capsys):
    write_png(str(tmp_path / "src" / "a.png"), gradient(20, 20))
    f = tmp_path / "file"
    f.write_text("keep me")
    rc, err = run([str(tmp_path / "src"), str(f), "--workers", "1"], capsys)
    assert rc == 2 and "exists and is not a directory" in one_line_error(err)
    rc, err = run([str(tmp_path / "src"), str(f / "sub"), "--workers", "1"], capsys)
    assert rc == 2 and "is a file, not a directory" in one_line_error(err)
    assert f.read_text() == "keep me"


def test_read_only_output(tmp_path, capsys, monkeypatch):
    write_png(str(tmp_path / "src" / "a.png"), gradient(20, 20))
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only directory (root ignores the mode bits)
        out.chmod(0o555)
        try:
            rc, err = run([str(tmp_path / "src"), str(out), "--workers", "1"], capsys)
        finally:
            out.chmod(0o755)
        assert rc == 2 and "permission denied" in one_line_error(err)
    real_open = open

    def refusing_open(path, mode="r", *a, **k):  # what a read-only mount answers
        if any(c in mode for c in "wax"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(prep, "open", refusing_open, raising=False)
    rc, err = run([str(tmp_path / "src"), str(out), "--workers", "1"], capsys)
    line = one_line_error(err)
    assert rc == 2 and "read-only file system" in line and "meta.json" in line


def test_full_disk_then_resume(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    src = tmp_path / "src"
    for i in range(5):
        write_png(str(src / f"im{i}.png"), gradient(20, 24, i))
    out = tmp_path / "out"
    out.mkdir()
    # the second shard's temporary file is the device that always answers ENOSPC
    os.symlink("/dev/full", out / "shard_00001.npy.tmp")
    args = [str(src), str(out), "--size", "16", "--workers", "1", "--shard-size", "3"]
    rc, err = run(args, capsys)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert line.startswith("afire prepare: error: cannot write the output ")
    assert "shard_00001.npy: no space left on the device" in line
    assert not any(n.endswith(".tmp") for n in os.listdir(out))  # cleaned up
    # space is back: the finished first shard is kept, the second one is written
    rc, err = run(args, capsys)
    assert rc == 0 and "1 of 2 shards already finished" in err and "5 images" in err
    rows, got = shard_rows(str(out))
    for r in rows:
        with Image.open(r["path"]) as im:  # 24x20 -> 19x16 (Lanczos), centre crop at x=1
            x = np.asarray(im.resize((19, 16), LANCZOS))[:, 1:17]
        np.testing.assert_array_equal(got[r["path"]], x)
