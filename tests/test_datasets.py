"""Dataset loaders, checksums, the restricted unpickler and batching.

References are independent of minisd.datasets: raw bytes parsed by hand here (struct/np.frombuffer), the shared
1000-image subsets, hashlib on the test's own bytes, Python's real pickle module on test-made pickles, and plain
loops for augmentation and batching.
"""
import gzip
import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest

from minisd import datasets as D
from minisd.download import ChecksumError
from minisd.errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# helpers: writers for the official formats, written from the format descriptions (not from minisd)

def write_idx(path, arr, gz=False):
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, row-major data."""
    arr = np.ascontiguousarray(arr, np.uint8)
    data = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(folder, n_train, n_test, rng, gz=False):
    """Synthetic MNIST-format files; returns {split: (images (N,28,28), labels (N,))}."""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def cifar_records(x, y):
    """CIFAR-10 binary version: per image 1 label byte, then R, G, B planes (1024 bytes each, row-major)."""
    recs = [bytes([int(lab)]) + img[0].tobytes() + img[1].tobytes() + img[2].tobytes() for img, lab in zip(x, y)]
    return b"".join(recs)


def write_cifar_bin(folder, n_per_file, rng, gz=False):
    """Synthetic cifar-10-batches-bin; returns {split: (images (N,3,32,32), labels)} and the raw bytes per file."""
    folder.mkdir(parents=True, exist_ok=True)
    out, raw = {}, {}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        xs, ys = [], []
        for name in names:
            x = rng.integers(0, 256, (n_per_file, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, 10, n_per_file, dtype=np.uint8)
            data = cifar_records(x, y)
            raw[name] = data
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out, raw


# ----------------------------------------------------------------------------------------------------------------
# real data in ../shared

@pytest.fixture(scope="module")
def shared_cifar(shared_dir):
    root = shared_dir / "data"
    return {s: D.load_cifar10(s, data_dir=root) for s in ("train", "test")}


def _raw_idx_labels(path):
    """Labels straight from the gzipped IDX bytes: 8-byte header (magic, count), then one byte per label."""
    data = gzip.decompress(path.read_bytes())
    magic, n = struct.unpack(">II", data[:8])
    assert magic == 0x801
    return np.frombuffer(data, np.uint8, offset=8), n


@pytest.mark.parametrize("split,n,prefix", [("train", 60000, "train"), ("test", 10000, "t10k")])
def test_mnist_shared(shared_dir, split, n, prefix):
    root = shared_dir / "data"
    x, y = D.load_mnist(split, data_dir=root)  # verify=True: checks the decompressed sha256 of both files
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.uint8 and x.flags.writeable
    assert y.shape == (n,) and y.dtype == np.int64
    ref_labels, count = _raw_idx_labels(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz")
    assert count == n
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.bincount(ref_labels, minlength=10))
    if split == "test":
        sub = np.load(shared_dir / "data" / "subsets" / "mnist_test_first1000.npz")
        np.testing.assert_array_equal(x[:1000, 0], sub["images"])
        np.testing.assert_array_equal(y[:1000], sub["labels"])


def test_cifar10_shared(shared_dir, shared_cifar):
    xtr, ytr = shared_cifar["train"]
    xte, yte = shared_cifar["test"]
    assert xtr.shape == (50000, 3, 32, 32) and xte.shape == (10000, 3, 32, 32)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    # Published on https://www.cs.toronto.edu/~kriz/cifar.html: 6000 images per class, 1000 of each in the test set.
    np.testing.assert_array_equal(np.bincount(ytr, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(yte, minlength=10), [1000] * 10)
    sub = np.load(shared_dir / "data" / "subsets" / "cifar10_test_first1000.npz")
    np.testing.assert_array_equal(xte[:1000], sub["images"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
    np.testing.assert_array_equal(yte[:1000], sub["labels"])
    # record 0 of data_batch_1, parsed by hand: label byte, then the red plane
    raw = gzip.decompress((shared_dir / "data/cifar10/cifar-10-batches-bin/data_batch_1.bin.gz").read_bytes())
    assert ytr[0] == raw[0]
    np.testing.assert_array_equal(xtr[0, 0], np.frombuffer(raw[1:1025], np.uint8).reshape(32, 32))
    names = (shared_dir / "data/cifar10/cifar-10-batches-bin/batches.meta.txt").read_text().split()
    assert tuple(names) == D.CIFAR10_CLASSES


def test_fashion_mnist_official_format_from_subset(shared_dir, tmp_path):
    """No full Fashion-MNIST in shared/: write its 1000-image subset in the official IDX layout, gzipped."""
    sub = np.load(shared_dir / "data" / "subsets" / "fashion_mnist_test_first1000.npz")
    write_idx(tmp_path / "fashion_mnist" / "t10k-images-idx3-ubyte", sub["images"], gz=True)
    write_idx(tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte", sub["labels"], gz=True)
    x, y = D.load_fashion_mnist("test", data_dir=tmp_path, verify=False)
    np.testing.assert_array_equal(x[:, 0], sub["images"])
    np.testing.assert_array_equal(y, sub["labels"])
    # With verification on, the 1000-image file is (rightly) not the official 10,000-image one.
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz.*5b4141f0afbad91edebe"):
        D.load_fashion_mnist("test", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# synthetic IDX files

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_synthetic(tmp_path, rng, gz):
    ref = write_mnist(tmp_path / "mnist", 7, 5, rng, gz)
    for split in ("train", "test"):
        x, y = D.load_mnist(split, data_dir=tmp_path, verify=False)
        assert x.shape == (len(ref[split][0]), 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0], ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])


def test_data_dir_resolution(tmp_path, rng, monkeypatch):
    ref = write_mnist(tmp_path / "mnist", 3, 2, rng)
    monkeypatch.setenv("MINISD_DATA", str(tmp_path))
    assert D.resolve_data_dir() == tmp_path
    np.testing.assert_array_equal(D.load_mnist("test", verify=False).labels, ref["test"][1])
    assert D.resolve_data_dir(tmp_path / "x") == tmp_path / "x"  # the argument wins over the environment
    monkeypatch.delenv("MINISD_DATA")
    assert D.resolve_data_dir() == D.Path("~/.cache/minisd/data").expanduser()
    # data_dir may also point straight at the folder holding the files
    np.testing.assert_array_equal(D.load_mnist("train", tmp_path / "mnist", verify=False).labels, ref["train"][1])


def test_missing_data_message(tmp_path):
    with pytest.raises(UserError) as e:
        D.load_mnist("train", data_dir=tmp_path / "nothing")
    msg = str(e.value)
    for part in (str(tmp_path / "nothing" / "mnist"), "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 f"minisd download mnist --data-dir {tmp_path / 'nothing'}", "MINISD_DATA"):
        assert part in msg, part
    with pytest.raises(UserError, match=r"cifar-10-batches-bin.*data_batch_1\.bin.*minisd download cifar10"):
        D.load_cifar10("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_mnist("validation", data_dir=tmp_path)


def test_idx_truncated_and_corrupt(tmp_path, rng):
    ref = write_mnist(tmp_path / "mnist", 4, 3, rng)
    img = tmp_path / "mnist" / "train-images-idx3-ubyte"
    full = img.read_bytes()
    img.write_bytes(full[:-5])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte: truncated IDX file.*\(4, 28, 28\).*3131 bytes"):
        D.load_mnist("train", tmp_path, verify=False)
    img.write_bytes(full + b"\0")
    with pytest.raises(UserError, match="too long IDX file"):
        D.load_mnist("train", tmp_path, verify=False)
    img.write_bytes(full[:10])  # shorter than the 16-byte header
    with pytest.raises(UserError, match="shorter than its 16-byte header"):
        D.load_mnist("train", tmp_path, verify=False)
    img.write_bytes(b"\x12\x34" + full[2:])
    with pytest.raises(UserError, match="not an IDX file: it starts with 12340803"):
        D.load_mnist("train", tmp_path, verify=False)
    write_idx(img, rng.integers(0, 256, (4, 27, 28)))  # valid IDX, wrong image size
    with pytest.raises(UserError, match=r"expected uint8 images of shape \(N, 28, 28\)"):
        D.load_mnist("train", tmp_path, verify=False)
    write_idx(img, ref["train"][0][:3])  # 3 images, 4 labels
    with pytest.raises(UserError, match="has 3 images but .* has 4 labels"):
        D.load_mnist("train", tmp_path, verify=False)
    # a truncated gzip file
    img.unlink()
    gz = write_idx(img, ref["train"][0], gz=True)
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz: cannot decompress.*truncated or corrupt"):
        D.load_mnist("train", tmp_path, verify=False)


def test_parse_idx_other_types():
    a = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    data = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 3, 4) + a.tobytes()
    np.testing.assert_array_equal(D.parse_idx(data), a)


def test_checksum_mismatch_names_file_expected_actual(tmp_path, rng):
    write_mnist(tmp_path / "mnist", 4, 3, rng)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ChecksumError) as e:
        D.load_mnist("test", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and actual in msg
    assert "expected sha256 0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7" in msg
    assert not path.with_name(path.name + ".verified").exists()


def test_verification_stamps(tmp_path, rng, monkeypatch):
    """Give the table the synthetic files' true hashes. Loading verifies but writes nothing; verify_dataset
    stamps; a load then trusts the stamp while size and mtime are unchanged, and a new mtime brings the check back."""
    write_mnist(tmp_path / "mnist", 4, 3, rng)
    folder = tmp_path / "mnist"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        content = (folder / name).read_bytes()
        monkeypatch.setitem(D._MNIST.files, name, D.FileSpec(len(content), hashlib.sha256(content).hexdigest(), None))
    x0, _ = D.load_mnist("test", tmp_path)
    assert not list(folder.glob("*.verified"))  # loaders never write into the data dir
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):  # train files keep the official hashes
        D.verify_dataset("mnist", tmp_path)
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-labels-idx1-ubyte").unlink()
    assert sorted(p.name for p in D.verify_dataset("mnist", tmp_path)) == ["t10k-images-idx3-ubyte",
                                                                          "t10k-labels-idx1-ubyte"]
    img = folder / "t10k-images-idx3-ubyte"
    stamp = json.loads((folder / "t10k-images-idx3-ubyte.verified").read_text())
    st = os.stat(img)
    assert stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "digests": {"sha256": D._MNIST.files["t10k-images-idx3-ubyte"].sha256}}
    # Same size, same mtime, one pixel changed: the stamp is trusted, i.e. the content is not hashed again.
    data = bytearray(img.read_bytes())
    data[16] ^= 0xFF  # first pixel of image 0
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert D.load_mnist("test", tmp_path).images[0, 0, 0, 0] == x0[0, 0, 0, 0] ^ 0xFF
    # A new mtime invalidates the stamp: the changed content is caught.
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte"):
        D.load_mnist("test", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 binary

@pytest.mark.parametrize("gz", [False, True])
def test_cifar10_binary_synthetic(tmp_path, rng, gz):
    ref, _ = write_cifar_bin(tmp_path / "cifar10" / "cifar-10-batches-bin", 3, rng, gz)
    for split in ("train", "test"):
        x, y = D.load_cifar10(split, data_dir=tmp_path, verify=False)
        assert x.dtype == np.uint8 and y.dtype == np.int64 and x.flags.c_contiguous
        np.testing.assert_array_equal(x, ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])


def test_cifar10_binary_truncated_and_bad_labels(tmp_path, rng):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    _, raw = write_cifar_bin(folder, 2, rng)
    (folder / "test_batch.bin").write_bytes(raw["test_batch.bin"][:-1])
    with pytest.raises(UserError, match=r"test_batch\.bin: 6145 bytes is not a whole number of CIFAR-10 records"):
        D.load_cifar10("test", tmp_path, verify=False)
    (folder / "test_batch.bin").write_bytes(b"\x0a" + raw["test_batch.bin"][1:])
    with pytest.raises(UserError, match="label byte 10 is not a CIFAR-10 class"):
        D.load_cifar10("test", tmp_path, verify=False)
    (folder / "test_batch.bin").write_bytes(raw["test_batch.bin"])
    with pytest.raises(ChecksumError, match=r"test_batch\.bin.*expected sha256 8e2eb146ae340b09"):
        D.load_cifar10("test", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 python version: hand-built pickles of the official structure, and malicious ones

def _str(b):
    """py2 cPickle writes a str as SHORT_BINSTRING (U, < 256 bytes) or BINSTRING (T)."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _int(v):
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def official_py2_batch(x2d, labels, batch_label=b"training batch 1 of 5"):
    """The opcodes Python 2's cPickle.dump(d, f, 2) writes for a CIFAR-10 batch dict with a numpy array
    (numpy's ndarray.__reduce__: _reconstruct(ndarray, (0,), 'b') then BUILD (1, shape, dtype, False, raw))."""
    n, w = x2d.shape
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b")
           + b"\x87R" + b"(" + _int(1) + _int(n) + _int(w) + b"\x86"
           + b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"
           + b"(" + _int(3) + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
           + b"\x89" + _str(x2d.tobytes()) + b"tb")
    lab = b"](" + b"".join(_int(int(v)) for v in labels) + b"e"
    names = b"](" + b"".join(_str(b"img_%d.png" % i) for i in range(n)) + b"e"
    return (b"\x80\x02}(" + _str(b"data") + arr + _str(b"labels") + lab + _str(b"batch_label") + _str(batch_label)
            + _str(b"filenames") + names + b"u.")


def test_safe_unpickle_official_structure_matches_pickle(rng):
    x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, 4)]
    blob = official_py2_batch(x, y)
    ref = pickle.loads(blob, encoding="bytes")  # the real unpickler (safe here: the test wrote these bytes)
    np.testing.assert_array_equal(ref[b"data"], x)
    got = D.safe_unpickle(blob)
    assert got.keys() == ref.keys() and got[b"labels"] == ref[b"labels"] == y
    assert got[b"filenames"] == ref[b"filenames"] and got[b"batch_label"] == ref[b"batch_label"]
    assert got[b"data"].dtype == np.uint8 and got[b"data"].flags.writeable
    np.testing.assert_array_equal(got[b"data"], ref[b"data"])


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_safe_unpickle_python3_pickles(rng, protocol):
    """Batches re-pickled by Python 3 + numpy 2 (protocol 5 stores arrays via _frombuffer)."""
    d = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3],
         "f32": np.asfortranarray(rng.standard_normal((2, 3)).astype(">f4")), "t": (1, 2.5, None, True)}
    got = D.safe_unpickle(pickle.dumps(d, protocol=protocol))
    for k in (b"data", "f32"):
        assert got[k].dtype == d[k].dtype
        np.testing.assert_array_equal(got[k], d[k])
    assert got[b"labels"] == [1, 2, 3] and got["t"] == (1, 2.5, None, True)


class _Payload:
    """Unpickling this calls fn(*args): the classic pickle exploit."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_safe_unpickle_refuses_code(tmp_path, rng):
    marker = tmp_path / "pwned"
    # Prove the payload is live: the real unpickler runs it and creates the file.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(open, str(live), "w")))
    assert live.exists()
    payloads = [_Payload(open, str(marker), "w"), _Payload(os.system, f"touch {marker}"),
                _Payload(eval, f"open({str(marker)!r}, 'w')"),
                {b"data": _Payload(np.save, str(marker), np.zeros(1))}]
    for p in payloads:
        for protocol in (2, 4, 5):
            with pytest.raises(D.UnsafePickleError, match="refused to unpickle: pickle refers to"):
                D.safe_unpickle(pickle.dumps(p, protocol=protocol), "evil")
    assert not marker.exists() and not (tmp_path / "pwned.npy").exists()
    # numpy globals other than the array reconstruction, object arrays, and misuse of the allowed ones
    with pytest.raises(D.UnsafePickleError, match="numpy.load"):
        D.safe_unpickle(b"\x80\x02cnumpy\nload\n" + _str(b"x") + b"\x85R.")
    with pytest.raises(D.UnsafePickleError, match="dtype 'O8'"):
        D.safe_unpickle(pickle.dumps(np.array([None, 1], dtype=object), protocol=4))
    with pytest.raises(D.UnsafePickleError, match="unexpected arguments"):
        D.safe_unpickle(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n" + _int(1) + _int(2) + _int(3) + b"\x87R.")
    with pytest.raises(UserError, match="not a valid pickle"):
        D.safe_unpickle(official_py2_batch(rng.integers(0, 256, (1, 3072), dtype=np.uint8), [1])[:-30])


def test_cifar10_python_version_loader(tmp_path, rng):
    ref, _ = write_cifar_bin(tmp_path / "bin" / "cifar10" / "cifar-10-batches-bin", 2, rng)
    py = tmp_path / "py" / "cifar10" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        x, y = ref[split]
        for i, name in enumerate(names):
            (py / name).write_bytes(official_py2_batch(x[2 * i:2 * i + 2].reshape(2, 3072), y[2 * i:2 * i + 2]))
    for split in ("train", "test"):
        xb, yb = D.load_cifar10(split, tmp_path / "bin", verify=False)
        xp, yp = D.load_cifar10(split, tmp_path / "py", verify=False)  # format="auto" finds the python version
        np.testing.assert_array_equal(xp, xb)
        np.testing.assert_array_equal(yp, yb)
        assert yp.dtype == np.int64
    with pytest.raises(ChecksumError, match=r"test_batch.*expected md5 40351d587109b95175f43aff81a1287e"):
        D.load_cifar10("test", tmp_path / "py", format="python")
    # a malicious batch file is refused and its payload never runs
    marker = tmp_path / "pwned"
    (py / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(open, str(marker), "w")}, protocol=2))
    with pytest.raises(D.UnsafePickleError, match=r"test_batch: refused to unpickle"):
        D.load_cifar10("test", tmp_path / "py", verify=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# batching and augmentation

def test_to_float_and_back():
    x = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    f = D.to_float(x)
    assert f.dtype == np.float32 and f.shape == x.shape
    ref = x.astype(np.float64) / 127.5 - 1.0
    assert np.max(np.abs(f - ref)) < 1e-7  # float32 rounding of values in [-1, 1]: at most 6e-8
    assert f.min() == -1.0 and f.max() == 1.0
    np.testing.assert_array_equal(D.to_uint8(f), x)
    assert D.to_float(x, np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="to_float: argument 'x' must be uint8"):
        D.to_float(f)


def test_random_flip_matches_loop(rng):
    x = rng.integers(0, 256, (9, 3, 4, 5), dtype=np.uint8)
    out = D.random_flip(x, np.random.default_rng(7))
    draws = np.random.default_rng(7).random(9)
    for i in range(9):
        want = x[i][:, :, ::-1] if draws[i] < 0.5 else x[i]
        np.testing.assert_array_equal(out[i], want)
    assert 0 < sum(draws < 0.5) < 9  # both branches exercised
    np.testing.assert_array_equal(D.random_flip(x, rng, p=0.0), x)
    np.testing.assert_array_equal(D.random_flip(x, rng, p=1.0), x[..., ::-1])


@pytest.mark.parametrize("drop_last", [True, False])
def test_iterate_minibatches(rng, drop_last):
    x = np.arange(23 * 2).reshape(23, 2)
    y = np.arange(23) * 10
    batches = list(D.iterate_minibatches(x, y, 5, np.random.default_rng(3), drop_last=drop_last))
    perm = np.random.default_rng(3).permutation(23)
    sizes = [len(b[0]) for b in batches]
    assert sizes == ([5] * 4 if drop_last else [5] * 4 + [3])
    for k, (xb, yb) in enumerate(batches):
        idx = perm[5 * k:5 * k + 5]
        np.testing.assert_array_equal(xb, x[idx])
        np.testing.assert_array_equal(yb, y[idx])
    ordered = list(D.iterate_minibatches(x, None, 10, shuffle=False, drop_last=False))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in ordered]), x)
    assert ordered[0][1] is None
    with pytest.raises(ValueError, match="needs rng"):
        next(D.iterate_minibatches(x, y, 5))


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (True, False), (False, False)])
def test_epoch_sampler_exact_resume(shuffle, drop_last):
    n, bs, steps = 17, 5, 20  # 3 or 4 batches per epoch: the run crosses several epoch boundaries
    full = D.EpochSampler(n, bs, np.random.default_rng(11), shuffle, drop_last)
    seq = [full.next_batch() for _ in range(steps)]
    # every epoch visits each index at most once, and exactly once without drop_last
    per_epoch = full.batches_per_epoch
    assert per_epoch == (3 if drop_last else 4)
    for e in range(steps // per_epoch):
        ep = np.concatenate(seq[e * per_epoch:(e + 1) * per_epoch])
        assert len(set(ep.tolist())) == len(ep) == (15 if drop_last else 17)
    if shuffle:  # epoch e's batches are the e-th permutation drawn from a same-seed generator, in order
        g = np.random.default_rng(11)
        for e in range(2):
            ep = np.concatenate(seq[e * per_epoch:(e + 1) * per_epoch])
            np.testing.assert_array_equal(ep, g.permutation(n)[:len(ep)])
    for cut in range(steps):
        s = D.EpochSampler(n, bs, np.random.default_rng(11), shuffle, drop_last)
        for _ in range(cut):
            s.next_batch()
        state = json.loads(json.dumps(s.state_dict()))  # it must survive a JSON checkpoint
        resumed = D.EpochSampler(n, bs, np.random.default_rng(999), shuffle, drop_last)
        resumed.load_state_dict(state)
        for k in range(cut, steps):
            np.testing.assert_array_equal(resumed.next_batch(), seq[k])
        assert resumed.epoch == full.epoch


def test_epoch_sampler_state_checks():
    s = D.EpochSampler(10, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="saved n=10 but this sampler has n=11"):
        D.EpochSampler(11, 3, np.random.default_rng(0)).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="PCG64"):
        D.EpochSampler(10, 3, np.random.Generator(np.random.MT19937(0))).load_state_dict(s.state_dict())
    mt = D.EpochSampler(10, 3, np.random.Generator(np.random.MT19937(5)))
    mt.next_batch()
    state = json.loads(json.dumps(mt.state_dict()))
    expect = [mt.next_batch() for _ in range(5)]
    r = D.EpochSampler(10, 3, np.random.Generator(np.random.MT19937(6)))
    r.load_state_dict(state)
    for e in expect:
        np.testing.assert_array_equal(r.next_batch(), e)
