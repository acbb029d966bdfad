"""afire._C.io safetensors reader/writer: round trips, foreign files, malformed files, I/O."""
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from afire._C import io

FIXTURES = Path(__file__).parent / "fixtures"


def raw_file(path, header, buffer=b"", hlen=None):
    """Write a safetensors-like file from a header (dict, str or bytes) and a buffer."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if hlen is None else hlen
    Path(path).write_bytes(struct.pack("<Q", n) + header + buffer)
    return path


def read_header(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n].decode("utf-8")), data


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# ---- round trips ---------------------------------------------------------------------

def all_dtypes():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f32.view(np.uint32)[0, 0] = 0x7FC00123  # a NaN with a payload must survive bit-exactly
    return {
        "f32": f32,
        "f64": rng.standard_normal((2, 2, 2)),
        "i8": np.array([-128, 0, 127], np.int8),
        "i16": np.array([[-32768, 5], [7, 32767]], np.int16),
        "i32": np.arange(-5, 5, dtype=np.int32),
        "i64": np.array([-(2**63), 2**63 - 1], np.int64),
        "u8": rng.integers(0, 256, (4, 4), dtype=np.uint8),
        "u16": np.array([0, 65535], np.uint16),
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "u64": np.array([0, 2**64 - 1], np.uint64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "scalar_i64": np.array(-7, np.int64),
        "empty": np.zeros((0,), np.float32),
        "empty2": np.zeros((3, 0, 2), np.int32),
        "eight_dims": np.arange(256, dtype=np.uint8).reshape((2,) * 8),
    }


def test_round_trip_all_dtypes_bit_exact(tmp_path):
    src = all_dtypes()
    meta = {"quote\"key": 'value with "quotes" \\ and \n newline\t\x01',
            "ünïcødé ☃": "😀 é",
            "": "empty key", "empty value": ""}
    p = tmp_path / "all.safetensors"
    io.save_safetensors(str(p), src, meta)
    got, got_meta = io.load_safetensors(str(p))
    assert set(got) == set(src)
    for k in src:
        assert_same(got[k], src[k])
    assert got_meta == meta


def test_names_with_unicode_and_escapes(tmp_path):
    src = {'a"b\\c': np.ones(1, np.float32), "blocks.0.ünï ☃😀": np.zeros(2, np.int64),
           "tab\tnew\nline": np.array([1], np.uint8)}
    p = tmp_path / "names.safetensors"
    io.save_safetensors(p, src)  # os.PathLike is accepted
    got, meta = io.load_safetensors(p)
    assert meta == {}
    assert sorted(got) == sorted(src)
    for k in src:
        assert_same(got[k], src[k])


def test_noncontiguous_and_byteswapped_inputs_are_copied(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = {"t": base.T, "strided": base[:, ::2], "be": np.arange(4, dtype=">i4"),
           "fortran": np.asfortranarray(base)}
    p = tmp_path / "nc.safetensors"
    io.save_safetensors(p, src)
    got, _ = io.load_safetensors(p)
    for k, v in src.items():
        assert got[k].dtype == v.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.c_contiguous


def test_layout_is_deterministic_and_aligned(tmp_path):
    src = {"b_u8": np.zeros(3, np.uint8), "a_f32": np.ones(3, np.float32),
           "c_f64": np.ones(1, np.float64), "a_u8": np.ones(1, np.uint8),
           "z_i16": np.ones(3, np.int16)}
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    io.save_safetensors(p1, src, {"k": "v"})
    io.save_safetensors(p2, dict(reversed(list(src.items()))), {"k": "v"})
    assert p1.read_bytes() == p2.read_bytes()
    n, header, data = read_header(p1)
    assert (8 + n) % 8 == 0
    text = data[8:8 + n].decode()
    assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) < 8
    assert list(header) == ["__metadata__", "c_f64", "a_f32", "z_i16", "a_u8", "b_u8"]
    for k, v in header.items():
        if k != "__metadata__":
            itemsize = src[k].dtype.itemsize
            assert v["data_offsets"][0] % itemsize == 0


def test_no_metadata_key_when_empty(tmp_path):
    p = tmp_path / "m.safetensors"
    io.save_safetensors(p, {"x": np.ones(2, np.float32)}, {})
    _, header, _ = read_header(p)
    assert "__metadata__" not in header
    io.save_safetensors(p, {})
    assert io.load_safetensors(p) == ({}, {})


def test_half_and_bfloat16_convert_to_float32(tmp_path):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)  # every float16 bit pattern
    rng = np.random.default_rng(1)
    b = rng.integers(0, 65536, 1000, dtype=np.uint32).astype(np.uint16)
    buf = h.tobytes() + b.tobytes()
    header = {"h": {"dtype": "F16", "shape": [256, 256], "data_offsets": [0, 131072]},
              "b": {"dtype": "BF16", "shape": [1000], "data_offsets": [131072, 133072]}}
    got, _ = io.load_safetensors(raw_file(tmp_path / "h.safetensors", header, buf))
    assert got["h"].dtype == np.float32 and got["h"].shape == (256, 256)
    want = h.view(np.float16).astype(np.float32).reshape(256, 256)
    assert got["h"].view(np.uint32).tolist() == want.view(np.uint32).tolist()
    want_b = (b.astype(np.uint32) << 16).view(np.float32)
    assert got["b"].view(np.uint32).tolist() == want_b.view(np.uint32).tolist()


def test_bool_bytes_are_normalised(tmp_path):
    header = {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    got, _ = io.load_safetensors(raw_file(tmp_path / "b.safetensors", header, b"\x00\x02\x01"))
    assert got["m"].view(np.uint8).tolist() == [0, 1, 1]


def test_escaped_header_strings_decode(tmp_path):
    header = ('{"\\u00e9\\ud83d\\ude00\\/\\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
              '"__metadata__":{"k":"a\\tb\\u0041"}}')
    got, meta = io.load_safetensors(raw_file(tmp_path / "e.safetensors", header, b"\x07"))
    assert list(got) == ['é😀/"']
    assert meta == {"k": "a\tbA"}


def test_padded_header_and_f8_dtype(tmp_path):
    header = '{"x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}' + " " * 5
    p = raw_file(tmp_path / "f8.safetensors", header, b"\x01\x02")
    with pytest.raises(ValueError, match="F8_E4M3"):
        io.load_safetensors(p)  # valid file, but no numpy dtype for it


# ---- files of the reference implementation -------------------------------------------

def test_committed_foreign_fixture_loads():
    got, meta = io.load_safetensors(FIXTURES / "foreign.safetensors")
    want = np.load(FIXTURES / "foreign_expected.npz")
    assert set(got) == set(want.files)
    for k in want.files:
        assert_same(got[k], want[k])
    assert meta == {"format": "pt", "note": 'quotes " and unicode é☃'}


def test_cross_check_with_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    src = all_dtypes()
    del src["eight_dims"]
    ours = tmp_path / "ours.safetensors"
    io.save_safetensors(ours, src, {"a": "b"})
    theirs = st.load_file(str(ours))
    for k in src:
        assert_same(theirs[k], src[k])
    foreign = tmp_path / "theirs.safetensors"
    src["half"] = np.array([1.5, -0.0, 65504, 6e-8], np.float16)
    st.save_file(src, str(foreign), metadata={"x": "y"})
    got, meta = io.load_safetensors(foreign)
    assert meta == {"x": "y"}
    for k in src:
        want = src[k].astype(np.float32) if k == "half" else src[k]
        assert_same(got[k], want)


# ---- malformed files -----------------------------------------------------------------

GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "U8", "shape": [2, 2], "data_offsets": [8, 12]}}
BUF = bytes(range(12))


def variant(**changes):
    h = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        name, field = k.split("__")
        if v is None:
            del h[name][field]
        else:
            h[name][field] = v
    return h


MALFORMED = [
    ("unknown dtype", variant(a__dtype="F33"), BUF),
    ("unknown dtype", variant(a__dtype=4), BUF),
    ("need 12 bytes but data_offsets span 8", variant(a__shape=[3]), BUF),
    ("shape", variant(a__shape=[-2]), BUF),
    ("shape", variant(a__shape=[2.0]), BUF),
    ("shape", variant(a__shape="2"), BUF),
    ("shape", variant(a__shape=[2**63]), BUF),
    ("overflow", variant(a__shape=[2**62, 2**62]), BUF),
    ("dimensions", variant(a__shape=[1] * 9), BUF),
    ("out of", variant(a__data_offsets=[0, 100]), BUF),
    ("out of", variant(a__data_offsets=[8, 0]), BUF),
    ("two non-negative", variant(a__data_offsets=[0, 4, 8]), BUF),
    ("two non-negative", variant(a__data_offsets=[-8, 0]), BUF),
    ("overlaps", variant(b__data_offsets=[4, 8], b__shape=[4]), BUF),
    ("hole", variant(a__data_offsets=[8, 16], b__data_offsets=[0, 4]), BUF + bytes(4)),
    ("hole", variant(b__data_offsets=[10, 14]), BUF + bytes(2)),
    ("trailing", GOOD, BUF + b"junk"),
    ("missing", variant(a__dtype=None), BUF),
    ("missing", variant(a__data_offsets=None), BUF),
    ("unexpected key", variant(a__extra=1), BUF),
    ("not an object", {"a": [1, 2], "b": GOOD["b"]}, BUF),
    ("__metadata__", dict(GOOD, __metadata__={"k": 1}), BUF),
    ("__metadata__", dict(GOOD, __metadata__=["k"]), BUF),
    ("start with", "[1, 2]", b""),  # top level must be an object
    ("start with", '"str"', b""),
    ("start with", "  {}", b""),
    ("duplicate key", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                      '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\x00\x00"),
    ("duplicate key", '{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
     b"\x00"),
    ("invalid JSON", '{"a":', b""),
    ("invalid JSON", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],}}', b"\x00"),
    ("invalid JSON", '{"a":{"dtype":"U8","shape":[01],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x', b"\x00"),
    ("invalid JSON", '{"a\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", '{"a\\q":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", '{"a\x01":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", b'{"a\xff":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", b'{"a\xc0\xaf":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", b'{"a\xed\xa0\x80":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
    ("invalid JSON", '{"__metadata__":{"k":' + "[" * 100 + "]" * 100 + "}}", b""),
    ("invalid JSON", '{"a":tru}', b""),
    ("invalid JSON", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}\\", b"\x00"),
    ("NUL", '{"a\\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x00"),
]


@pytest.mark.parametrize("expect,header,buf", MALFORMED)
def test_malformed_files_raise_value_error(tmp_path, expect, header, buf):
    p = raw_file(tmp_path / "bad.safetensors", header, buf)
    with pytest.raises(ValueError, match=expect):
        io.load_safetensors(p)


def test_good_variant_is_valid(tmp_path):
    # The malformed cases above are each one change away from this file.
    got, _ = io.load_safetensors(raw_file(tmp_path / "good.safetensors", GOOD, BUF))
    assert got["a"].tobytes() == BUF[:8] and got["b"].tolist() == [[8, 9], [10, 11]]


@pytest.mark.parametrize("hlen,expect", [(2**63 + 5, "100 MiB"), (100 * 2**20 + 1, "100 MiB"),
                                         (10_000, "exceeds"), (0, "start with")])
def test_bad_header_length(tmp_path, hlen, expect):
    p = raw_file(tmp_path / "h.safetensors", json.dumps(GOOD), BUF, hlen=hlen)
    with pytest.raises(ValueError, match=expect):
        io.load_safetensors(p)


def test_truncated_at_every_region(tmp_path):
    good = tmp_path / "good.safetensors"
    io.save_safetensors(good, {"w": np.arange(10, dtype=np.float32), "b": np.ones(3, np.int64)})
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cuts = [0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            io.load_safetensors(p)


def test_random_corruption_never_crashes(tmp_path):
    good = tmp_path / "good.safetensors"
    io.save_safetensors(good, {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                               "i": np.arange(3, dtype=np.int64)}, {"k": "v"})
    data = bytearray(good.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    rng = np.random.default_rng(7)
    p = tmp_path / "fuzz.safetensors"
    for _ in range(300):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, 8 + n))] = int(rng.integers(0, 256))
        p.write_bytes(bytes(d))
        try:
            got, _ = io.load_safetensors(p)
        except ValueError:
            continue
        # Whatever survives validation stays inside the data buffer (x2: F16 widens to F32).
        assert sum(a.nbytes for a in got.values()) <= 2 * (len(data) - 8 - n)


# ---- file system errors and atomicity -------------------------------------------------

def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        io.load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(OSError):
        io.load_safetensors(tmp_path)  # a directory


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.save_safetensors(tmp_path / "missing" / "x.safetensors", {"a": np.ones(1, np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_write_below_a_file(tmp_path):
    (tmp_path / "afile").write_bytes(b"keep")
    with pytest.raises(NotADirectoryError):
        io.save_safetensors(tmp_path / "afile" / "x.safetensors", {"a": np.ones(1, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["afile"]
    assert (tmp_path / "afile").read_bytes() == b"keep"


def test_failed_rename_removes_temp_file(tmp_path):
    # The temporary file is fully written, then rename() onto a directory fails.
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        io.save_safetensors(target, {"a": np.ones(100, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert os.listdir(target) == ["inside"]


def test_existing_file_survives_bad_arguments(tmp_path):
    p = tmp_path / "keep.safetensors"
    io.save_safetensors(p, {"a": np.ones(2, np.float32)})
    before = p.read_bytes()
    bad = [({"a": np.ones(2, np.float16)}, None, TypeError),
           ({"a": [1, 2]}, None, TypeError),
           ({1: np.ones(2, np.float32)}, None, TypeError),
           ({"a": np.ones(2, object)}, None, TypeError),
           ({"a": np.ones(2, np.complex64)}, None, TypeError),
           ({"__metadata__": np.ones(2, np.float32)}, None, ValueError),
           ({"a\x00b": np.ones(2, np.float32)}, None, ValueError),
           ({"a": np.ones((1,) * 9, np.float32)}, None, ValueError),
           ({"a": np.ones(2, np.float32)}, {"k": 1}, TypeError),
           ({"a": np.ones(2, np.float32)}, ["k"], TypeError),
           ([("a", np.ones(2, np.float32))], None, TypeError)]
    for tensors, meta, exc in bad:
        with pytest.raises(exc):
            io.save_safetensors(p, tensors, meta)
        assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_existing_file_survives_failure_mid_write(tmp_path):
    # RLIMIT_FSIZE makes write() fail with EFBIG after the temp file has been created and
    # partly written; run in a child so the limit does not leak into pytest.
    p = tmp_path / "keep.safetensors"
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(repo)!r})
        from afire._C import io
        p = {str(p)!r}
        io.save_safetensors(p, {{"a": np.arange(4, dtype=np.float32)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            io.save_safetensors(p, {{"a": np.ones(100000, np.float32)}})
        except OSError as e:
            print("OSError", e.errno)
        else:
            print("no error")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("OSError")
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]
    got, _ = io.load_safetensors(p)
    assert got["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_overwrite_replaces_content(tmp_path):
    p = tmp_path / "x.safetensors"
    io.save_safetensors(p, {"a": np.ones(2, np.float32)})
    io.save_safetensors(p, {"b": np.zeros(3, np.int32)}, {"m": "2"})
    got, meta = io.load_safetensors(p)
    assert list(got) == ["b"] and meta == {"m": "2"}
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]
