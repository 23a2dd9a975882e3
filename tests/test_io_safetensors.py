"""minisd.io.safetensors: round trips, interop with the reference `safetensors` package (and torch for bf16/fp8),
unaligned offsets, atomic writes, every corruption case, and (slow) peak memory of a full 1 GB load."""
import json
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from minisd.io import safetensors as st
from minisd.io.safetensors import SafetensorsError, SafetensorsFile, load, save

ALL_DTYPES = ["f8", "f4", "f2", "c8", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "?"]


def _random(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _mixed(rng):
    """One tensor per dtype with odd shapes, plus scalars (shape ()) and empty tensors, in a deliberately mixed order
    so that a 1-byte tensor comes before an 8-byte one."""
    t = {}
    for i, d in enumerate(ALL_DTYPES[::-1]):
        t[f"t.{d}"] = _random(rng, d, (3, 5, i + 1))
    t["scalar.f4"] = np.array(2.5, np.float32)
    t["scalar.i8"] = np.array(-7, np.int64)
    t["empty.f4"] = np.zeros((0, 3), np.float32)
    t["empty.u1"] = np.zeros((4, 0, 2), np.uint8)
    return t


def _write_raw(path, header, data, pad=True):
    """Hand-craft a file: [u64 len][json header][data]; used for unaligned and corrupt files."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


# ----------------------------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_every_dtype(tmp_path, rng, mmap):
    t = _mixed(rng)
    save(t, tmp_path / "x.safetensors", metadata={"format": "pt", "note": "héllo"})
    with SafetensorsFile(tmp_path / "x.safetensors", mmap=mmap) as f:
        assert f.keys() == list(t)  # header keeps the caller's order
        assert f.metadata == {"format": "pt", "note": "héllo"}
        assert f.shape("t.f2") == t["t.f2"].shape and f.dtype("t.f2") == "F16" and f.dtype("t.?") == "BOOL"
        out = {k: f.get(k) for k in f.keys()}
    for k, a in t.items():
        assert out[k].dtype == a.dtype and out[k].shape == a.shape, k
        np.testing.assert_array_equal(out[k], a)
        assert out[k].flags.aligned
        assert out[k].flags.writeable == (not mmap)  # mmap views are read-only; mmap=False reads are private
    # the views outlive the file object (the map is released when the last view is freed)
    assert float(np.sum(out["t.f4"], dtype=np.float64)) == float(np.sum(t["t.f4"], dtype=np.float64))
    assert list(load(tmp_path / "x.safetensors", names=["t.i2", "t.f8"])) == ["t.i2", "t.f8"]
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        load(tmp_path / "x.safetensors", names=["nope"])


def test_writer_layout_is_aligned_and_padded(tmp_path, rng):
    save(_mixed(rng), tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b"}", b" ")
    header = json.loads(raw[8:8 + n])
    for k, v in header.items():
        size = st.ITEMSIZE[v["dtype"]]
        assert v["data_offsets"][0] % size == 0, k


def test_non_contiguous_big_endian_and_list_inputs(tmp_path, rng):
    a = rng.standard_normal((6, 7))
    t = {"transposed": a.T, "strided": a[::2, 1::3], "big": a.astype(">f4"), "bigint": np.arange(5, dtype=">i4"),
         "list": [[1.0, 2.0]]}
    save(t, tmp_path / "x.safetensors")
    out = load(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(out["transposed"], a.T)
    np.testing.assert_array_equal(out["strided"], a[::2, 1::3])
    assert out["big"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(out["big"], a.astype(np.float32))
    np.testing.assert_array_equal(out["bigint"], np.arange(5))
    np.testing.assert_array_equal(out["list"], [[1.0, 2.0]])


# ----------------------------------------------------------------------------------------------------------------
# interop with the reference implementation

def test_minisd_file_reads_in_reference(tmp_path, rng):
    stn = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    t = _mixed(rng)
    save(t, tmp_path / "x.safetensors", metadata={"a": "1"})
    ref = stn.load_file(str(tmp_path / "x.safetensors"))
    assert set(ref) == set(t)
    for k, a in t.items():
        assert ref[k].dtype == a.dtype and ref[k].shape == a.shape, k
        np.testing.assert_array_equal(ref[k], a)
    with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        assert f.metadata() == {"a": "1"}


def test_reference_file_reads_in_minisd(tmp_path, rng):
    stn = pytest.importorskip("safetensors.numpy")
    t = _mixed(rng)
    stn.save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata == {"format": "np"}
        assert set(f.keys()) == set(t)
        for k, a in t.items():
            b = f.get(k)
            assert b.dtype == a.dtype and b.shape == a.shape, k
            np.testing.assert_array_equal(b, a)


def _bf16_edge_values(rng):
    """float32 values that exercise bf16 rounding: exact ties (both parities), just above/below ties, NaN with a
    low-only payload, +-inf, the largest finite float32 (rounds to inf), subnormals, and random values."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F800001, 0xFFC00000, 0x7F800000,
                     0xFF800000, 0x7F7FFFFF, 0x00000001, 0x00018000, 0x80008000, 0x00000000, 0x80000000],
                    dtype=np.uint32)
    return np.concatenate([bits.view(np.float32), rng.standard_normal(500).astype(np.float32) * 1e3])


def test_bf16_write_matches_torch_rounding(tmp_path, rng):
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    x = _bf16_edge_values(rng)
    save({"x": x, "keep": x[:3].copy()}, tmp_path / "b.safetensors", dtypes={"x": "BF16"})
    with SafetensorsFile(tmp_path / "b.safetensors") as f:
        assert f.dtype("x") == "BF16" and f.dtype("keep") == "F32"
        got = f.get("x")
    ref = torch.from_numpy(x).to(torch.bfloat16)
    raw = (tmp_path / "b.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8:8 + n])["x"]["data_offsets"]
    stored_bits = np.frombuffer(raw[8 + n + begin:8 + n + end], "<u2")
    ref_bits = ref.view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(stored_bits[finite], ref_bits[finite])  # bit-exact round-to-nearest-even
    assert np.isnan(got[~finite]).all()  # NaN stays NaN (torch may pick another NaN payload)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[finite], ref.float().numpy()[finite])
    # and the reference package reads our bf16 as the same values
    back = stt.load_file(str(tmp_path / "b.safetensors"))["x"]
    assert back.dtype == torch.bfloat16
    np.testing.assert_array_equal(back.float().numpy()[finite], got[finite])


def test_f16_write_and_dtype_string(tmp_path, rng):
    x = rng.standard_normal((4, 3)).astype(np.float32) * 1e3
    x[0, 0] = 1e6  # overflows float16 -> inf
    i = np.arange(3, dtype=np.int32)
    d = rng.standard_normal(3)  # float64 is not touched by a string dtypes
    save({"x": x, "i": i, "d": d}, tmp_path / "h.safetensors", dtypes="F16")
    with SafetensorsFile(tmp_path / "h.safetensors") as f:
        assert (f.dtype("x"), f.dtype("i"), f.dtype("d")) == ("F16", "I32", "F64")
        torch = pytest.importorskip("torch")
        np.testing.assert_array_equal(f.get("x"), torch.from_numpy(x).half().numpy())


def test_torch_written_bf16_fp16_fp8_read_in_minisd(tmp_path):
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g) * 50
    every_byte = torch.arange(256, dtype=torch.uint8)
    t = {"bf16": base.to(torch.bfloat16), "f16": base.half(), "f32": base, "i64": torch.arange(-3, 4),
         "bool": base > 0, "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
         "e4m3": every_byte.view(torch.float8_e4m3fn), "e5m2": every_byte.clone().view(torch.float8_e5m2)}
    stt.save_file(t, str(tmp_path / "t.safetensors"))
    out = load(tmp_path / "t.safetensors")
    for k, v in t.items():
        ref = v.float().numpy() if v.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) else v.numpy()
        assert out[k].dtype == ref.dtype and out[k].shape == ref.shape, k
        np.testing.assert_array_equal(out[k], ref, err_msg=k)  # NaN == NaN for assert_array_equal


def test_unaligned_offsets(tmp_path, rng):
    """A hand-made file whose tensors sit at odd offsets (the format allows it): values must still be right."""
    a8 = rng.integers(-100, 100, 3, dtype=np.int8)
    f4 = rng.standard_normal((2, 3)).astype(np.float32)
    f8 = rng.standard_normal(5)
    bf = np.array([0x3F80, 0xC000, 0x7F80], dtype="<u2")  # 1.0, -2.0, inf
    data = a8.tobytes() + f4.tobytes() + f8.tobytes() + bf.tobytes()
    o1, o2, o3 = 3, 3 + f4.nbytes, 3 + f4.nbytes + f8.nbytes
    header = {"a8": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
              "f4": {"dtype": "F32", "shape": [2, 3], "data_offsets": [o1, o2]},
              "f8": {"dtype": "F64", "shape": [5], "data_offsets": [o2, o3]},
              "bf": {"dtype": "BF16", "shape": [3], "data_offsets": [o3, o3 + 6]}}
    path = _write_raw(tmp_path / "odd.safetensors", header, data, pad=False)
    for mmap in (True, False):
        out = load(path, mmap=mmap)
        np.testing.assert_array_equal(out["a8"], a8)
        np.testing.assert_array_equal(out["f4"], f4)
        np.testing.assert_array_equal(out["f8"], f8)
        np.testing.assert_array_equal(out["bf"], [1.0, -2.0, np.inf])
        assert all(v.flags.aligned for v in out.values())
    pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    ref = stt.load_file(str(path))  # the reference agrees on the values of this odd file
    for k in out:
        np.testing.assert_array_equal(ref[k].float().numpy() if k == "bf" else ref[k].numpy(), out[k])


# ----------------------------------------------------------------------------------------------------------------
# atomic writes and save() input checks

def test_save_is_atomic(tmp_path, rng, monkeypatch):
    path = tmp_path / "w.safetensors"
    save({"old": np.arange(4, dtype=np.float32)}, path)
    before = path.read_bytes()
    calls = []

    def failing(a, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(a, target)

    real = st._stored_bytes
    monkeypatch.setattr(st, "_stored_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        save({"a": np.ones(100, np.float32), "b": np.ones(100, np.float32)}, path)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # and no temp file is left behind
    monkeypatch.setattr(st, "_stored_bytes", real)
    save({"new": np.zeros(2, np.float64)}, path)  # a successful save replaces it
    assert list(load(path)) == ["new"]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)  # permissions of a normally created file


@pytest.mark.parametrize("kwargs, match", [
    (dict(tensors={"a": np.array(["x"])}), "cannot store"),
    (dict(tensors={"a": np.zeros(2, object)}), "cannot store"),
    (dict(tensors={"__metadata__": np.zeros(2)}), "names must be strings"),
    (dict(tensors={3: np.zeros(2)}), "names must be strings"),
    (dict(tensors={"a": np.zeros(2)}, metadata={"k": 1}), "metadata must be a dict of str"),
    (dict(tensors={"a": np.zeros(2)}, dtypes={"b": "F16"}), "not being saved"),
    (dict(tensors={"a": np.zeros(2, np.int32)}, dtypes={"a": "BF16"}), "cannot store tensor 'a'"),
    (dict(tensors={"a": np.zeros(2, np.float32)}, dtypes={"a": "I8"}), "cannot store tensor 'a'"),
    (dict(tensors={"a": np.zeros(2, np.int8)}, dtypes="F8"), "dtypes='F8'"),
])
def test_save_bad_input(tmp_path, kwargs, match):
    with pytest.raises(SafetensorsError, match=match):
        save(path=tmp_path / "bad.safetensors", **kwargs)
    assert not list(tmp_path.iterdir())  # refused before any file was created


# ----------------------------------------------------------------------------------------------------------------
# corrupt files: every case is a SafetensorsError naming the file, never a NumPy error or a partial dict

F4 = np.arange(4, dtype=np.float32).tobytes()
OK = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


def _with(name, **changes):
    h = json.loads(json.dumps(OK))
    h[name].update(changes)
    return h


CORRUPT = {
    # name: (file bytes builder, message fragment, does the reference also refuse it?)
    "empty": (lambda: b"", None, "shorter than the 8-byte", True),
    "short": (lambda: b"\x05\x00\x00", None, "shorter than the 8-byte", True),
    "header_past_end": (lambda: struct.pack("<Q", 50_000_000) + b"{}", None, "runs past the end", True),
    "header_absurd": (lambda: struct.pack("<Q", 2 ** 62) + b"{}" + b" " * 100, None, "larger than the 100000000",
                      True),
    "not_utf8": (lambda: struct.pack("<Q", 4) + b"\xff\xfe{}", None, "not valid UTF-8", True),
    "bad_json": (lambda: struct.pack("<Q", 9) + b'{"a": [1,' + F4, None, "not valid JSON", True),
    "json_list": ("hdr", [1, 2], "must be a JSON object", True),
    "unknown_dtype": ("hdr", _with("a", dtype="F31"), "unknown dtype 'F31'", True),
    "unsupported_dtype": ("hdr", _with("a", dtype="F4"), "does not read", False),
    "negative_dim": ("hdr", _with("a", shape=[-2]), "non-negative integers", True),
    "float_dim": ("hdr", _with("a", shape=[2.0]), "non-negative integers", True),
    "bool_dim": ("hdr", _with("a", shape=[True, 2]), "non-negative integers", True),
    "bad_offsets": ("hdr", _with("a", data_offsets=[8, 0]), "data_offsets", True),
    "missing_offsets": ("hdr", {"a": {"dtype": "F32", "shape": [4]}}, "data_offsets", True),
    "wrong_nbytes": ("hdr", _with("a", shape=[3]), "needs 12 bytes", True),
    "truncated": ("trunc", OK, "truncated", True),
    "overlap": ("hdr", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "overlaps", True),
    "gap": ("hdr", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "gap of 4 bytes", True),
    "trailing": ("hdr", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "not covered", True),
    "meta_int": ("hdr", {"__metadata__": {"k": 1}, **OK}, "__metadata__ must map strings", True),
    "meta_list": ("hdr", {"__metadata__": ["k"], **OK}, "__metadata__ must map strings", True),
    "entry_not_object": ("hdr", {"a": [1, 2], "b": OK["b"]}, "must be an object", True),
    "duplicate_name": ("dup", None, "names 'a' twice", False),
}


def _corrupt_bytes(kind, spec):
    if callable(kind):
        return kind()
    if kind in ("raw", "hdr"):
        hb = json.dumps(spec).encode()
        return struct.pack("<Q", len(hb)) + hb + F4
    if kind == "trunc":
        hb = json.dumps(spec).encode()
        return struct.pack("<Q", len(hb)) + hb + F4[:-3]
    if kind == "dup":
        hb = (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')
        return struct.pack("<Q", len(hb)) + hb + F4


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises(tmp_path, case):
    kind, spec, fragment, ref_refuses = CORRUPT[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_corrupt_bytes(kind, spec))
    for mmap in (True, False):
        with pytest.raises(SafetensorsError, match=fragment) as e:
            load(path, mmap=mmap)
        assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    # Independent check of the rule itself: the reference reader refuses the same file (duplicate names and
    # the exotic-but-valid F4 dtype are the two places where we deliberately differ).
    stn = pytest.importorskip("safetensors.numpy")
    if ref_refuses:
        with pytest.raises(Exception):
            stn.load_file(str(path))


def test_huge_header_length_is_refused_before_reading(tmp_path):
    """A 20-byte file claiming a 99 MB header: refused without allocating anything like 99 MB."""
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 99_000_000) + b"{}" + b" " * 10)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match="runs past the end"):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


# ----------------------------------------------------------------------------------------------------------------
# memory: a full load of a ~1 GB file costs ~1x the file, not 2x

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from minisd.io.safetensors import load

    def peak_rss():
        # Linux keeps ru_maxrss across fork+exec, so in a child of a big process it reports the *parent's* peak.
        # VmHWM (the high-water mark of this process's own address space) starts fresh at exec; use it when
        # there is /proc, and ru_maxrss (KiB on Linux) elsewhere.
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    base = peak_rss()
    tensors = load(sys.argv[1], mmap=sys.argv[2] == "1")
    total = sum(float(np.sum(t, dtype=np.float64)) for t in tensors.values())  # touches every value
    print(base, peak_rss(), total)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mmap", [True, False])
def test_full_load_peak_memory(tmp_path, mmap):
    n_tensors, per = 8, 32 * 1024 * 1024  # 8 x 128 MiB float32 = 1 GiB of data
    path = tmp_path / "big.safetensors"
    expected = 0.0
    chunk = {}
    for i in range(n_tensors):
        chunk[f"w{i}"] = np.full(per, i + 0.5, np.float32)
        expected += (i + 0.5) * per
    save(chunk, path)
    del chunk
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), "1" if mmap else "0"],
                         capture_output=True, text=True, check=True)
    base, peak, total = (float(v) for v in out.stdout.split())
    assert total == expected
    extra = peak - base
    print(f"mmap={mmap}: file {size / 2**30:.3f} GiB, baseline RSS {base / 2**20:.0f} MiB, "
          f"peak RSS {peak / 2**20:.0f} MiB, extra {extra / size:.3f}x the file")
    assert extra < 1.2 * size


@pytest.mark.gpu
def test_save_cupy_arrays(tmp_path):
    cupy = pytest.importorskip("cupy")
    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    save({"a": a, "t": a.T}, tmp_path / "gpu.safetensors", dtypes={"t": "BF16"})
    out = load(tmp_path / "gpu.safetensors")
    np.testing.assert_array_equal(out["a"], cupy.asnumpy(a))
    np.testing.assert_array_equal(out["t"], cupy.asnumpy(a.T))  # small integers are exact in bf16
