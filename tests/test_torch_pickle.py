"""afire.torch_pickle: torch.save checkpoints -> numpy without torch, and refusing code."""
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from afire.torch_pickle import CheckpointArgs, load_torch_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = np.load(FIXTURES / "pth_expected.npz")


def flatten(obj, prefix, out):
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, np.ndarray):
        out[prefix] = obj
    return out


@pytest.mark.parametrize("name", ["plain", "dino", "half", "views"])
def test_fixture_matches_torch(name):
    got = flatten(load_torch_checkpoint(FIXTURES / f"pth_{name}.pth"), name, {})
    want = {k: EXPECTED[k] for k in EXPECTED.files if k.startswith(name + "/")}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k
        assert got[k].flags.c_contiguous and got[k].flags.writeable


def test_plain_state_dict():
    sd = load_torch_checkpoint(FIXTURES / "pth_plain.pth")
    assert isinstance(sd, OrderedDict)
    assert list(sd)[:2] == ["0.weight", "0.bias"]
    assert sd["0.weight"].shape == (3, 4) and sd["0.weight"].dtype == np.float32
    assert sd["2.num_batches_tracked"].dtype == np.int64 and sd["2.num_batches_tracked"].shape == ()
    assert sd["mask"].dtype == np.bool_ and sd["mask"].tolist() == [True, False, True]
    assert sd["index"].dtype == np.int32 and sd["index"].tolist() == [3, -1]
    assert sd._metadata[""] == {"version": 1}  # the state_dict's attribute survives


def test_nested_dino_checkpoint():
    ck = load_torch_checkpoint(FIXTURES / "pth_dino.pth")
    assert type(ck) is dict and ck["epoch"] == 3
    assert isinstance(ck["student"], dict) and isinstance(ck["teacher"], dict)
    assert not np.array_equal(ck["student"]["0.weight"], ck["teacher"]["0.weight"])
    args = ck["args"]
    assert isinstance(args, CheckpointArgs)
    assert (args.arch, args.patch_size, args.out_dim, args.lst) == ("vit_small", 16, 65536, [1, 2])
    assert args.use_bn_in_head is False and args.teacher_temp == 0.04
    assert ck["dino_loss"]["center"].shape == (1, 8)
    opt = ck["optimizer"]
    assert opt["param_groups"][0]["lr"] == 1e-3
    assert opt["state"][0]["exp_avg"].shape == (3, 4)


def test_half_and_bfloat16_become_float32():
    ck = load_torch_checkpoint(FIXTURES / "pth_half.pth")
    assert ck["h"].dtype == np.float32 and ck["b"].dtype == np.float32
    want_h = np.array([0.0, 1.0, -2.5, 6e-8, 65504.0, np.inf], np.float16).astype(np.float32)
    assert ck["h"].tobytes() == want_h.tobytes()
    assert ck["b"][0].tolist() == [1.0, -0.5] and ck["b"][1, 0] == 3.140625
    assert ck["b"].shape == (2, 2)
    assert ck["f64"].dtype == np.float64 and ck["f64"][0] == 1.0 / 3.0
    assert ck["i8"].dtype == np.int8 and ck["i8"].tolist() == [-7, 8]


def test_views_strides_and_offsets():
    ck = load_torch_checkpoint(FIXTURES / "pth_views.pth")
    base = np.arange(20, dtype=np.float32).reshape(4, 5) / 4
    np.testing.assert_array_equal(ck["base"], base)
    np.testing.assert_array_equal(ck["t"], base.T)
    np.testing.assert_array_equal(ck["row"], base[2])
    np.testing.assert_array_equal(ck["block"], base[1:3, 1:4])
    np.testing.assert_array_equal(ck["flat_offset"], base.reshape(-1)[7:12])
    np.testing.assert_array_equal(ck["col"], base[:, 3])
    np.testing.assert_array_equal(ck["param"], np.ones((2, 2), np.float32))
    assert ck["empty"].shape == (0, 5)
    ck["t"][0, 0] = 99.0  # copies: views of one storage do not alias each other
    assert ck["base"][0, 0] == 0.0


# ---- refusing code ---------------------------------------------------------------------

def torch_like_zip(path, pkl, storages=None, byteorder="little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def test_committed_malicious_fixture_is_refused(capfd):
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global '(posix|os|nt)\.system'"):
        load_torch_checkpoint(FIXTURES / "pth_malicious.pth")
    assert "pwned" not in capfd.readouterr().out


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker):
    import builtins
    import os
    import subprocess
    return [
        _Reduce(os.system, (f"touch {marker}",)),
        _Reduce(builtins.exec, (f"open({str(marker)!r}, 'w')",)),
        _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        _Reduce(subprocess.call, (["touch", str(marker)],)),
        _Reduce(builtins.getattr, ("text", "upper")),
        _Reduce(Path.touch, (marker,)),
    ]


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_runtime_malicious_pickles_never_execute(tmp_path, protocol):
    marker = tmp_path / "pwned"
    for i, payload in enumerate(_payloads(marker)):
        p = torch_like_zip(tmp_path / f"evil{i}.pth",
                           pickle.dumps({"state_dict": {"w": payload}}, protocol=protocol))
        with pytest.raises(pickle.UnpicklingError, match="refusing global"):
            load_torch_checkpoint(p)
        assert not marker.exists()


# ---- hand-assembled pickles exercising the rebuild path ----------------------------------

def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v):
    return b"J" + struct.pack("<i", v)


def _tuple(items):
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(storage_type="FloatStorage", key="0", numel=6, offset=0, size=(2, 3),
                  stride=(3, 1), pid=None):
    """Protocol-2 opcodes for {'x': _rebuild_tensor_v2(storage, offset, size, stride, ...)}."""
    if pid is None:
        pid = _tuple([_str("storage"), b"ctorch\n" + storage_type.encode() + b"\n", _str(key),
                      _str("cpu"), _int(numel)])
    args = _tuple([pid + b"Q", _int(offset), _tuple([_int(v) for v in size]),
                   _tuple([_int(v) for v in stride]), b"\x89",
                   b"ccollections\nOrderedDict\n)R"])
    return (b"\x80\x02}" + _str("x") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs.")


def test_hand_built_tensor_pickle(tmp_path):
    raw = np.arange(6, dtype="<f4").tobytes()
    p = torch_like_zip(tmp_path / "ok.pth", tensor_pickle(), {"0": raw})
    x = load_torch_checkpoint(p)["x"]
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]]
    pkl = tensor_pickle(offset=1, size=(2, 2), stride=(1, 2))
    p = torch_like_zip(tmp_path / "strided.pth", pkl, {"0": raw})
    assert load_torch_checkpoint(p)["x"].tolist() == [[1, 3], [2, 4]]


def test_big_endian_byteorder(tmp_path):
    raw = np.arange(6, dtype=">i8").tobytes()
    p = torch_like_zip(tmp_path / "be.pth", tensor_pickle("LongStorage"), {"0": raw},
                       byteorder="big")
    x = load_torch_checkpoint(p)["x"]
    assert x.dtype == np.int64 and x.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("kwargs,storage,match", [
    (dict(offset=1), 24, "reads past"),
    (dict(stride=(4, 1)), 24, "reads past"),
    (dict(size=(2, 4)), 24, "reads past"),
    (dict(size=(-2, 3)), 24, "negative"),
    (dict(size=(2,)), 24, "differ in rank"),
    (dict(), 20, "has 20 bytes"),
    (dict(key="missing"), 24, "missing storage"),
    (dict(storage_type="QUInt8Storage"), 24, "refusing global"),
    (dict(pid=_str("storage")), 24, "persistent id"),
])
def test_bad_tensor_records(tmp_path, kwargs, storage, match):
    p = torch_like_zip(tmp_path / "bad.pth", tensor_pickle(**kwargs), {"0": bytes(storage)})
    with pytest.raises((ValueError, pickle.UnpicklingError), match=match):
        load_torch_checkpoint(p)


# ---- broken files ----------------------------------------------------------------------

def test_truncated_zip_raises_value_error(tmp_path):
    data = (FIXTURES / "pth_plain.pth").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30, len(data) - 1):
        p = tmp_path / f"cut{cut}.pth"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_torch_checkpoint(p)


def test_corrupted_storage_bytes_raise_value_error(tmp_path):
    data = bytearray((FIXTURES / "pth_plain.pth").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/0")))
    # The local header's extra field (torch's alignment padding) differs from the central one.
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start] ^= 0xFF  # CRC mismatch on read
    p = tmp_path / "crc.pth"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        load_torch_checkpoint(p)


def test_other_files_raise_value_error(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(ValueError, match="legacy"):
        load_torch_checkpoint(legacy)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a PyTorch"):
        load_torch_checkpoint(text)
    nopkl = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(nopkl, "w") as z:
        z.writestr("archive/other.txt", "x")
    with pytest.raises(ValueError, match="data.pkl"):
        load_torch_checkpoint(nopkl)
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "missing.pth")
