"""MNIST, Fashion-MNIST and CIFAR-10: readers for the official files, checksums, downloads and minibatching.

Shapes: images are uint8 NCHW, (N, 1, 28, 28) for MNIST / Fashion-MNIST and (N, 3, 32, 32) for CIFAR-10;
labels are int64 (N,). Loaders return `Split(images, labels)` (a NamedTuple, so `x, y = load_mnist()` works);
class names are in CLASS_NAMES. `to_float` maps images to float32 in [-1, 1] for the diffusion models.

Data location: the `data_dir` argument, else $MINISD_DATA, else ~/.cache/minisd/data. Layout under it:

    mnist/                              train-images-idx3-ubyte  train-labels-idx1-ubyte
                                        t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
    fashion_mnist/                      the same four names (Fashion-MNIST reuses MNIST's file names and format)
    cifar10/cifar-10-batches-bin/       data_batch_1.bin ... data_batch_5.bin  test_batch.bin   (binary version)
    cifar10/cifar-10-batches-py/        data_batch_1 ... data_batch_5  test_batch              (python version)

Every file may be stored as is or gzipped (`name.gz`; recognised by its magic bytes). A shared read-only copy with
this layout (e.g. ../shared/data) works as a data_dir. `minisd download mnist|fashion_mnist|cifar10` fills it.

File formats
  IDX (MNIST page, "FILE FORMATS"): big-endian. Bytes 0-1 are zero, byte 2 the element type (0x08 = uint8),
  byte 3 the number of dims; then one uint32 per dim; then the data, row-major. Images: magic 0x00000803,
  dims (N, 28, 28); labels: magic 0x00000801, dims (N,). Both the header and the exact length are checked.
  CIFAR-10 binary: records of 3073 bytes, 10,000 per file: 1 label byte (0-9), then 1024 red, 1024 green and
  1024 blue bytes, each plane 32x32 row-major, so a record's pixels reshape directly to (3, 32, 32).
  CIFAR-10 python: a Python-2 pickle of {b'data': uint8 ndarray (10000, 3072) in the same pixel order,
  b'labels': list of 10000 ints, b'batch_label': bytes, b'filenames': list of bytes}. Unpickling can run any
  code, so these files are read only by `safe_unpickle`: it allows the plain structure (dict, list, tuple,
  bytes, str, int, float, bool, None) and numpy's ndarray/dtype reconstruction, re-implemented here on stand-in
  objects that only ever build a numeric array from raw bytes. Any other global (os.system, eval, ...) is
  refused before it is resolved, so nothing runs.

Checksums. Gzip bytes differ between mirrors (and between recompressions of the same data), so the value that
identifies the data is the sha256 of the *decompressed* file; that is what loaders and `minisd download` check.
The publishers' own values are md5s of the files as they serve them; `minisd download` checks those too when it
fetches from the official URL (with --mirror only the decompressed content is checked, as a mirror may
recompress). `minisd download` (and verify_dataset) verify each file once and leave a `<file>.verified` stamp
keyed by size + mtime (see minisd/download.py); loaders trust a valid stamp, else hash the bytes they have just
read (cheap next to gunzip) without writing anything. `verify=False` / `--no-verify` skips all checks, e.g. for
deliberately modified files.

| file, decompressed    | bytes    | sha256 of it (first 16)  | publisher's md5 of the served file            |
| MNIST train-images    | 47040016 | ba891046e6505d7a         | f68b3c2dcbeaaa9fbdd348bbdeb94873 (.gz)        |
| MNIST train-labels    |    60008 | 65a50cbbf4e906d7         | d53e105ee54ea40749a09fcbcd1e9432 (.gz)        |
| MNIST t10k-images     |  7840016 | 0fa7898d509279e4         | 9fb629c4189551a2d022fa330f9573f3 (.gz)        |
| MNIST t10k-labels     |    10008 | ff7bcfd416de3373         | ec29112dd5afa0611ce80d1b7f02629c (.gz)        |
| Fashion train-images  | 47040016 | c59f468a2f672dc8         | 8d4fb7e6c68d591d4c3dfef9ec88bf0d (.gz)        |
| Fashion train-labels  |    60008 | bad3541b69d91243         | 25c81989df183df01b3e8a0aad5dffbe (.gz)        |
| Fashion t10k-images   |  7840016 | 5b4141f0afbad91e         | bef4ecab320f06d8554ea6380940ec79 (.gz)        |
| Fashion t10k-labels   |    10008 | 0402a96d92fd2663         | bb300cfdad3c16e7a12a480ee83cd310 (.gz)        |
| CIFAR-10 *.bin (x6)   | 30730000 | in _CIFAR10.files        | per .bin in _CIFAR10.files; archive c32a1d4a  |
The full values are in the DatasetSpec tables below.
Sources:
  MNIST .gz md5: torchvision's MNIST.resources (mirror https://ossci-datasets.s3.amazonaws.com/mnist/), see
    https://github.com/pytorch/vision/blob/01977a187961243eaf66ead246fd92a5c6c7ccfc/torchvision/datasets/mnist.py
  Fashion-MNIST .gz md5: the Zalando README table, https://github.com/zalandoresearch/fashion-mnist#get-the-data
  CIFAR-10 archive md5 (c32a1d4ab5d03f1284b67883e8d87530 binary, c58f30108f718f92721af3b95e74349a python):
    https://www.cs.toronto.edu/~kriz/cifar.html ; per-file md5 of the .bin files as listed by third-party fetch
    scripts, and of the python-version files in torchvision's CIFAR10.train_list/test_list
    (torchvision/datasets/cifar.py).
  Decompressed sha256: computed for minisd from copies whose content matches the published values (MNIST and
    CIFAR-10: the project's shared copy, whose .bin md5s equal the published ones; Fashion-MNIST: Debian's
    dataset-fashion-mnist 0.0~git20200523.55506a9-1), and equal to the values independent third-party download
    scripts list for the same files. Fashion-MNIST note: Debian recompressed the .gz (its md5s differ from
    Zalando's), which is exactly why the decompressed hash is the one checked.

Official URLs (this development machine cannot reach them; tests use a local server and --mirror):
  MNIST:          https://ossci-datasets.s3.amazonaws.com/mnist/  (the original http://yann.lecun.com/exdb/mnist/
                  often refuses downloads) + train-images-idx3-ubyte.gz etc.
  Fashion-MNIST:  http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ , and
                  https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/
  CIFAR-10:       https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz

Batching: `iterate_minibatches` walks one shuffled epoch; `EpochSampler` is the resumable version a trainer
checkpoints (epoch, position, generator state at the start of the epoch) to continue with exactly the batches an
uninterrupted run would have seen. `random_flip` is the horizontal-flip augmentation used for CIFAR-10.
"""
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .download import (ChecksumError, DownloadError, check_digests, download, file_digests, is_verified,
                       mark_verified, safe_extract_tar)
from .errors import UserError

DEFAULT_DATA_DIR = "~/.cache/minisd/data"

MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLASS_NAMES = {"mnist": MNIST_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


class DatasetError(UserError):
    """A dataset file is missing, truncated or not in the expected format; the message says which and what to do."""


class UnsafePickleError(DatasetError):
    """A pickle asked for something other than plain data and numpy arrays; nothing of it was executed."""


class Split(NamedTuple):
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64


# ----------------------------------------------------------------------------------------------------------------
# the checksum table (see the module docstring for sources)

class FileSpec(NamedTuple):
    size: Optional[int]  # bytes of the decompressed file, e.g. 47040016
    sha256: Optional[str]  # of the decompressed file
    md5: Optional[str]  # of the decompressed file, where that is what is published


class DatasetSpec(NamedTuple):
    name: str  # e.g. "mnist"
    folder: str  # under the data dir, e.g. "mnist" or "cifar10/cifar-10-batches-bin"
    splits: dict  # split -> file names (decompressed names), e.g. {"train": ("train-images-idx3-ubyte", ...)}
    files: dict  # file name -> FileSpec
    urls: tuple  # official base URLs, tried in order
    sources: dict  # what `minisd download` fetches from a base URL: served name -> published md5 of those bytes


_MNIST = DatasetSpec(
    name="mnist", folder="mnist",
    splits={"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
    files={
        "train-images-idx3-ubyte": FileSpec(47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", None),
        "train-labels-idx1-ubyte": FileSpec(60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", None),
        "t10k-images-idx3-ubyte": FileSpec(7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", None),
        "t10k-labels-idx1-ubyte": FileSpec(10008,
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", None),
    },
    urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    sources={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
)

_FASHION_MNIST = DatasetSpec(
    name="fashion_mnist", folder="fashion_mnist", splits=_MNIST.splits,
    files={
        "train-images-idx3-ubyte": FileSpec(47040016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", None),
        "train-labels-idx1-ubyte": FileSpec(60008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", None),
        "t10k-images-idx3-ubyte": FileSpec(7840016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", None),
        "t10k-labels-idx1-ubyte": FileSpec(10008,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", None),
    },
    urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
          "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    sources={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
)

_CIFAR10 = DatasetSpec(
    name="cifar10", folder="cifar10/cifar-10-batches-bin",
    splits={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    files={  # sha256 and published md5 of each decompressed .bin
        "data_batch_1.bin": FileSpec(30730000,
            "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5", "5dd7e06a14cb22eb9f671a540d1b7c25"),
        "data_batch_2.bin": FileSpec(30730000,
            "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed", "5ea93a67294ea407fff1d09f752e9692"),
        "data_batch_3.bin": FileSpec(30730000,
            "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67", "942cd6a4bcdd0dd3c604fbe906cb4421"),
        "data_batch_4.bin": FileSpec(30730000,
            "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48", "ae636b3ba5c66a11e91e8cb52e771fcb"),
        "data_batch_5.bin": FileSpec(30730000,
            "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add", "53f37980c15c3d472c316c40844f3f0d"),
        "test_batch.bin": FileSpec(30730000,
            "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b", "803d5f7f4d78ea53de84dbe85f74fb6d"),
    },
    urls=("https://www.cs.toronto.edu/~kriz/",),
    sources={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
)

# The python version (cifar-10-python.tar.gz, md5 c58f30108f718f92721af3b95e74349a) is read but not downloaded:
# md5 of each pickle as torchvision lists them; no sha256 is published and minisd had no copy to compute one.
_CIFAR10_PY = DatasetSpec(
    name="cifar10", folder="cifar10/cifar-10-batches-py",
    splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    files={"data_batch_1": FileSpec(None, None, "c99cafc152244af753f735de768cd75f"),
           "data_batch_2": FileSpec(None, None, "d4bba439e000b95fd0a9bffe97cbabec"),
           "data_batch_3": FileSpec(None, None, "54ebc095f3ab1f0389bbae665268c751"),
           "data_batch_4": FileSpec(None, None, "634d18415352ddfa80567beed471001a"),
           "data_batch_5": FileSpec(None, None, "482c414d41f54cd18b22e5b47cb7c3cb"),
           "test_batch": FileSpec(None, None, "40351d587109b95175f43aff81a1287e")},
    urls=(), sources={},
)

DATASETS = {"mnist": _MNIST, "fashion_mnist": _FASHION_MNIST, "cifar10": _CIFAR10}


# ----------------------------------------------------------------------------------------------------------------
# locating and reading files

def resolve_data_dir(data_dir=None):
    """The data directory: `data_dir` if given, else $MINISD_DATA, else ~/.cache/minisd/data (user-expanded)."""
    if data_dir is None:
        data_dir = os.environ.get("MINISD_DATA") or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _candidate_dirs(root, folder):
    """Folders searched, in order: the documented layout (root/folder), then root/<last part of folder> (e.g. an
    extracted cifar-10-batches-bin next to other data), then root itself (data_dir pointing at the files)."""
    out = []
    for d in (root / folder, root / Path(folder).name, root):
        if d not in out:
            out.append(d)
    return out


def _find(path_without_gz):
    """The file as stored: `name` or `name.gz` (the uncompressed one wins: it is faster to read), or None."""
    for p in (path_without_gz, path_without_gz.with_name(path_without_gz.name + ".gz")):
        if p.is_file():
            return p
    return None


def _locate(spec, split, data_dir):
    """Paths of the split's files, all from one folder. Raises DatasetError with a how-to when they are missing."""
    if split not in spec.splits:
        raise ValueError(f"{spec.name}: split must be one of {sorted(spec.splits)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    names = spec.splits[split]
    for d in _candidate_dirs(root, spec.folder):
        found = [_find(d / n) for n in names]
        if all(found):
            return found
    primary = root / spec.folder
    missing = [n for n in names if _find(primary / n) is None]
    origin = ("the data_dir argument" if data_dir is not None else
              "$MINISD_DATA" if os.environ.get("MINISD_DATA") else f"the default {DEFAULT_DATA_DIR}")
    raise DatasetError(
        f"{spec.name}: the {split} split is not in {primary} (data directory {root}, from {origin}; also looked "
        f"in {', '.join(str(d) for d in _candidate_dirs(root, spec.folder)[1:])}). Missing: "
        f"{', '.join(n + '[.gz]' for n in missing)}; the split needs {', '.join(n + '[.gz]' for n in names)}. "
        f"Get them with `minisd download {spec.name} --data-dir {root}`, or copy the official files (gzipped "
        f"or not) into {primary}. The data directory is --data-dir / data_dir, else $MINISD_DATA, else "
        f"{DEFAULT_DATA_DIR}.")


def _read_bytes(path):
    """The file's content, gunzipped when it starts with the gzip magic. Decompression errors name the file."""
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: cannot decompress it ({type(e).__name__}: {e}): the gzip file is truncated "
                           f"or corrupt. Delete it and download it again.") from None


def _label(path):
    return f"{path} (decompressed content)" if path.name.endswith(".gz") else str(path)


def _expected(entry):
    return {a: d for a, d in (("sha256", entry.sha256), ("md5", entry.md5)) if d is not None}


def _verify_bytes(path, data, entry, dataset):
    """Check the decompressed `data` of `path` against the table, unless a valid stamp says it was done.

    Loaders hash the bytes they already hold in memory (~2 GB/s for sha256, a few % of the gunzip time) and
    never write stamps: loading must not write into the data dir (a shared copy may be read-only, or writable
    only because the process runs as root). Stamps come from `minisd download` / verify_dataset.
    """
    expected = _expected(entry)
    if not expected or is_verified(path, expected):
        return
    actual = {a: hashlib.new(a, data).hexdigest() for a in expected}
    check_digests(_label(path), actual, expected,
                  hint=f"Delete it and run `minisd download {dataset} --data-dir DIR`, or load with verify=False "
                       f"to use a modified copy on purpose.")


def _verify_path(path, entry, dataset):
    """Like _verify_bytes, reading (and gunzipping) the file in a stream; used by download_dataset."""
    expected = _expected(entry)
    if not expected or is_verified(path, expected):
        return
    check_digests(_label(path), file_digests(path, tuple(expected), decompress=True),
                  expected, hint=f"Delete it and run `minisd download {dataset}` again.")
    mark_verified(path, expected)


def verify_dataset(name, data_dir=None):
    """Verify every file of a dataset that is present (decompressed sha256 / md5 against the table) and stamp it,
    so later loads skip the hashing. Returns the verified paths; raises ChecksumError on the first mismatch."""
    specs = [DATASETS[name]] + ([_CIFAR10_PY] if name == "cifar10" else [])
    root, done = resolve_data_dir(data_dir), []
    for spec in specs:
        for n, entry in spec.files.items():
            p = _find(root / spec.folder / n)
            if p is not None:
                _verify_path(p, entry, spec.name)
                done.append(p)
    return done


# ----------------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

# type byte -> dtype; IDX is big-endian, hence '>' for multi-byte types
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data, name="<bytes>"):
    """IDX bytes -> read-only ndarray of the dims in the header. Validates magic, dims and exact length."""
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DatasetError(
            f"{name}: not an IDX file: it starts with {data[:4].hex() or 'nothing'} where the magic number "
            f"00 00 <type> <ndim> is expected (00000803 for images, 00000801 for labels). Delete it and download "
            f"it again.")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX file: {len(data)} bytes, shorter than its {header}-byte "
                           f"header. Delete it and download it again.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(dims)
    need, have = count * dtype.itemsize, len(data) - header
    if have != need:
        what = "truncated" if have < need else "too long"
        raise DatasetError(f"{name}: {what} IDX file: the header says dims {dims} ({need} bytes of data) but "
                           f"{have} bytes follow it. Delete it and download it again.")
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(dims)  # (dims...)


def _load_idx_split(spec, split, data_dir, verify):
    img_path, lbl_path = _locate(spec, split, data_dir)
    arrays = []
    for path, kind, ndim in ((img_path, "images", 3), (lbl_path, "labels", 1)):
        data = _read_bytes(path)
        a = parse_idx(data, str(path))
        shape_ok = a.ndim == ndim and (kind == "labels" or a.shape[1:] == (28, 28))
        if a.dtype != np.uint8 or not shape_ok:
            want = "(N, 28, 28), magic 00000803" if kind == "images" else "(N,), magic 00000801"
            raise DatasetError(f"{path}: expected uint8 {kind} of shape {want}; got {a.dtype} {a.shape}. Is "
                               f"this the right file?")
        if verify:
            _verify_bytes(path, data, spec.files[path.name.removesuffix(".gz")], spec.name)
        arrays.append(a)
    images, labels = arrays
    if len(images) != len(labels):
        raise DatasetError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels; "
                           f"the two files must come from the same split.")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{lbl_path}: labels must be 0-9, found {int(labels.max())}. Is this the right file?")
    return Split(images.reshape(-1, 1, 28, 28).copy(), labels.astype(np.int64))  # (N, 1, 28, 28)


def load_mnist(split="train", data_dir=None, verify=True):
    """MNIST: images uint8 (60000 | 10000, 1, 28, 28), labels int64. split is "train" or "test"."""
    return _load_idx_split(_MNIST, split, data_dir, verify)


def load_fashion_mnist(split="train", data_dir=None, verify=True):
    """Fashion-MNIST (same IDX format and file names, folder fashion_mnist/): (N, 1, 28, 28) uint8, int64."""
    return _load_idx_split(_FASHION_MNIST, split, data_dir, verify)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10, binary version

_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes


def parse_cifar10_binary(data, name="<bytes>"):
    """Binary-version bytes -> (images (N, 3, 32, 32) uint8 read-only view, labels (N,) uint8 view)."""
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DatasetError(f"{name}: {len(data)} bytes is not a whole number of CIFAR-10 records ({_CIFAR_RECORD} "
                           f"bytes each: 1 label byte + 3072 pixel bytes): the file is truncated or not the "
                           f"CIFAR-10 binary version. Delete it and download it again.")
    rec = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)  # (N, 3073)
    labels = rec[:, 0]
    if labels.max() > 9:
        raise DatasetError(f"{name}: label byte {int(labels.max())} is not a CIFAR-10 class (0-9); CIFAR-100's "
                           f"binary files have 2 label bytes per record. Is this the right file?")
    # The 3072 pixel bytes are 1024 red, 1024 green, 1024 blue, each 32x32 row-major: exactly C, H, W order.
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels  # (N, 3, 32, 32), (N,)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10, python version: a restricted unpickler

class _NDArrayClass:
    """Stands for the global numpy.ndarray, which official pickles pass to _reconstruct as the array type.
    An instance, not a class, so the NEWOBJ opcode cannot instantiate it."""


_NDARRAY = _NDArrayClass()
# dtypes a dataset array may have: plain numbers only (an object dtype would hold pickled Python objects)
_SAFE_DTYPES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"}


def _text(v):
    return v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else v


class _DtypeStub:
    """Stands for numpy.dtype(spec, align, copy) during unpickling; BUILD then passes numpy's dtype state
    (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]) to __setstate__."""

    def __init__(self, spec):
        spec = _text(spec)
        if spec not in _SAFE_DTYPES:
            raise UnsafePickleError(f"pickle asks for dtype {spec!r}; only plain numeric dtypes are allowed")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafePickleError(f"unexpected dtype state {state!r:.80}")
        byteorder = _text(state[1])
        if byteorder not in ("|", "<", ">", "=") or any(s is not None for s in state[2:5]):
            raise UnsafePickleError(f"dtype state with byte order {byteorder!r} or structured fields is refused")
        if byteorder in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(byteorder)


def _dtype(spec, align=0, copy=1):
    return _DtypeStub(spec)


def _array_from_raw(shape, dtype, fortran, raw):
    """A fresh numeric ndarray from pickled raw bytes, after checking every piece of the state."""
    if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
        raise UnsafePickleError(f"ndarray shape {shape!r:.80} is not a tuple of sizes")
    if not isinstance(dtype, _DtypeStub):
        raise UnsafePickleError("ndarray dtype was not built by numpy.dtype")
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError(f"ndarray data must be raw bytes, got {type(raw).__name__} (object arrays are "
                                f"refused)")
    need = math.prod(shape) * dtype.dtype.itemsize
    if len(raw) != need:
        raise UnsafePickleError(f"ndarray of shape {shape} {dtype.dtype} needs {need} bytes, the pickle has "
                                f"{len(raw)}")
    flat = np.frombuffer(raw, dtype.dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()  # writable, owns its memory


class _ArrayStub:
    """Stands for an ndarray: _reconstruct returns an empty one, BUILD fills it from numpy's array state
    ([version,] shape, dtype, is_fortran, raw bytes), copying the raw bytes into a fresh numeric array."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError(f"unexpected ndarray state of type {type(state).__name__}")
        if len(state) == 5:
            if state[0] != 1:
                raise UnsafePickleError(f"unexpected ndarray state version {state[0]!r}")
            state = state[1:]
        self.array = _array_from_raw(*state)


def _reconstruct(cls, shape, typecode):
    """numpy's _reconstruct(ndarray, (0,), b'b') creates an empty array that BUILD fills; nothing else allowed."""
    if cls is not _NDARRAY or shape != (0,) or _text(typecode) != "b":
        raise UnsafePickleError("numpy _reconstruct called with unexpected arguments")
    return _ArrayStub()


def _frombuffer(buf, dtype, shape, order):
    """Protocol-5 pickles (Python 3's default) store arrays as numpy's _frombuffer(buffer, dtype, shape, order)."""
    if _text(order) not in ("C", "F"):
        raise UnsafePickleError(f"unexpected array order {order!r:.20}")
    stub = _ArrayStub()
    stub.array = _array_from_raw(shape, dtype, _text(order) == "F", buf)
    return stub


class _SafeUnpickler(pickle.Unpickler):
    # The only globals pickled numpy arrays need: _reconstruct + ndarray + dtype (protocols 0-4, as in the official
    # Python-2 files) and _frombuffer + dtype (protocol 5). numpy 1 writes numpy.core, numpy 2 numpy._core. They
    # map to our stand-ins above, never to numpy's own functions.
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy.core.numeric", "_frombuffer"): _frombuffer,
                ("numpy._core.numeric", "_frombuffer"): _frombuffer,
                ("numpy", "ndarray"): _NDARRAY,
                ("numpy", "dtype"): _dtype}

    def find_class(self, module, name):
        # Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ, extension codes) goes through here:
        # refusing here means the object is never even imported, let alone called.
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"pickle refers to {module}.{name}, which is not allowed") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("pickle uses persistent ids, which are not allowed")


_PLAIN = (bytes, bytearray, str, int, float, bool, type(None))


def _materialize(obj):
    """Replace stand-ins by their arrays and refuse anything that is not plain data."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise UnsafePickleError("ndarray without data")
        return obj.array
    if isinstance(obj, _DtypeStub):
        return obj.dtype
    if isinstance(obj, dict):
        return {_materialize(k): _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    raise UnsafePickleError(f"object of type {type(obj).__name__} is not allowed")


def safe_unpickle(data, name="<bytes>"):
    """Unpickle dict/list/tuple/bytes/str/int/float/bool/None and numeric numpy arrays; refuse everything else.

    Py2 strings come back as bytes (encoding="bytes"), as in the official CIFAR-10 batches. Raises
    UnsafePickleError (nothing was executed) or DatasetError (not a valid pickle).
    """
    try:
        return _materialize(_SafeUnpickler(io.BytesIO(data), encoding="bytes").load())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{name}: refused to unpickle: {e}. Only plain data and numpy arrays are read; "
                                f"this is not an official CIFAR-10 python-version file.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, RecursionError) as e:
        raise DatasetError(f"{name}: not a valid pickle ({type(e).__name__}: {e}). Delete it and download it "
                           f"again.") from None


def parse_cifar10_python(data, name="<bytes>"):
    """Python-version batch bytes -> (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    d = safe_unpickle(data, name)
    if not isinstance(d, dict):
        raise DatasetError(f"{name}: expected a pickled dict, got {type(d).__name__}")
    x = d.get(b"data", d.get("data"))
    y = d.get(b"labels", d.get("labels"))
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise DatasetError(f"{name}: 'data' must be a uint8 array of shape (N, 3072), got "
                           f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not (isinstance(y, list) and len(y) == len(x) and all(type(v) is int and 0 <= v <= 9 for v in y)):
        raise DatasetError(f"{name}: 'labels' must be a list of {len(x)} ints in 0-9")
    return x.reshape(-1, 3, 32, 32), np.asarray(y, np.int64)  # rows are R, G, B planes of 32x32: (N, 3, 32, 32)


def load_cifar10(split="train", data_dir=None, verify=True, format="auto"):
    """CIFAR-10: images uint8 (50000 | 10000, 3, 32, 32), labels int64.

    format: "binary" (cifar-10-batches-bin, the default download), "python" (cifar-10-batches-py, read with the
    restricted unpickler) or "auto" (binary when its files are there, else python).
    """
    if format not in ("auto", "binary", "python"):
        raise ValueError(f"load_cifar10: format must be 'auto', 'binary' or 'python', got {format!r}")
    if format == "auto":
        try:
            paths, spec = _locate(_CIFAR10, split, data_dir), _CIFAR10
        except DatasetError as binary_missing:
            try:
                paths, spec = _locate(_CIFAR10_PY, split, data_dir), _CIFAR10_PY
            except DatasetError:
                raise binary_missing from None  # the message about the recommended (binary) version
    else:
        spec = _CIFAR10 if format == "binary" else _CIFAR10_PY
        paths = _locate(spec, split, data_dir)
    parse = parse_cifar10_binary if spec is _CIFAR10 else parse_cifar10_python
    xs, ys = [], []
    for path in paths:
        data = _read_bytes(path)
        x, y = parse(data, str(path))
        if verify:
            _verify_bytes(path, data, spec.files[path.name.removesuffix(".gz")], "cifar10")
        xs.append(x)
        ys.append(y)
    return Split(np.concatenate(xs), np.concatenate(ys).astype(np.int64))  # (N, 3, 32, 32), (N,)


def load_dataset(name, split="train", data_dir=None, verify=True):
    """load_mnist / load_fashion_mnist / load_cifar10 by name ("mnist", "fashion_mnist", "cifar10")."""
    loaders = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(loaders)}")
    return loaders[name](split, data_dir=data_dir, verify=verify)


# ----------------------------------------------------------------------------------------------------------------
# downloading (minisd download)

def _fetch(bases, filename, dest, log, **kw):
    """Try each base URL in turn; the last failure is raised."""
    for i, base in enumerate(bases):
        url = base.rstrip("/") + "/" + filename
        try:
            return download(url, dest, **kw)
        except DownloadError as e:
            if i + 1 == len(bases):
                raise
            log(f"{e}\ntrying the next mirror")


def _present(spec, folder, verify, log):
    """True if every file of `spec` is in `folder` (and verified). A file that fails verification is deleted
    (with its stamp) so that it is downloaded again."""
    ok = True
    for n, entry in spec.files.items():
        p = _find(folder / n)
        if p is None:
            ok = False
            continue
        if verify:
            try:
                _verify_path(p, entry, spec.name)
            except ChecksumError as e:
                log(f"{e}\nremoving {p} to download it again")
                p.unlink()
                p.with_name(p.name + ".verified").unlink(missing_ok=True)
                ok = False
    return ok


def download_dataset(name, data_dir=None, mirror=None, verify=True, keep_archive=False, progress=True,
                     log=print):
    """Download and unpack a dataset into the data dir layout; returns the dataset folder.

    mirror: a base URL replacing the official ones (file names are appended: MNIST-style names, or
            cifar-10-binary.tar.gz). verify: check the decompressed sha256 of every file (and, from the official
            URL, the publisher's md5 of the downloaded file). Files already present and verified are skipped.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    root = resolve_data_dir(data_dir)
    folder = root / spec.folder
    if _present(spec, folder, verify, log):
        log(f"{name}: already in {folder}" + (" (checksums verified)" if verify else ""))
        return folder
    bases = (mirror,) if mirror else spec.urls
    official_md5 = verify and not mirror  # a mirror may serve recompressed bytes: then only content is checked
    if name == "cifar10":
        _download_cifar10(spec, root, bases, official_md5, verify, keep_archive, progress, log)
    else:
        for served, md5 in spec.sources.items():
            content = served.removesuffix(".gz")
            if _find(folder / content) is not None:
                continue  # present (and verified by _present when verify is on)
            entry = spec.files[content]

            def check(part, entry=entry, served=served):
                check_digests(f"{served} (decompressed content)",
                              file_digests(part, tuple(_expected(entry)), decompress=True), _expected(entry),
                              hint="The download was deleted. The mirror serves a different file; use the "
                                   "official one.")

            dest = _fetch(bases, served, folder / served, log, md5=md5 if official_md5 else None,
                          check=check if verify else None, progress=progress)
            if verify:
                mark_verified(dest, _expected(entry))
            log(f"{name}: {served} downloaded" + (" and verified" if verify else ""))
    log(f"{name}: ready in {folder}")
    return folder


def _download_cifar10(spec, root, bases, official_md5, verify, keep_archive, progress, log):
    (archive_name, md5), = spec.sources.items()
    parent = root / "cifar10"  # the archive's top folder is cifar-10-batches-bin/
    archive = parent / archive_name
    if not archive.exists():
        _fetch(bases, archive_name, archive, log, md5=md5 if official_md5 else None, progress=progress)
        log(f"cifar10: {archive_name} downloaded" + (" (md5 verified)" if official_md5 else ""))
    safe_extract_tar(archive, parent)
    folder = root / spec.folder
    try:
        for n, entry in spec.files.items():
            p = _find(folder / n)
            if p is None:
                raise DatasetError(f"{archive} did not contain cifar-10-batches-bin/{n}: it is not the CIFAR-10 "
                                   f"binary-version archive. It was deleted; check the URL or mirror.")
            if verify:
                _verify_path(p, entry, "cifar10")
    except UserError:
        # Remove what this archive produced so neither the loader nor a rerun trusts it.
        for n in spec.files:
            (folder / n).unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise
    if not keep_archive:
        archive.unlink()
    log("cifar10: extracted" + (" and verified" if verify else ""))


# ----------------------------------------------------------------------------------------------------------------
# batching and augmentation

def to_float(x, dtype=np.float32):
    """uint8 images (any shape) -> `dtype` in [-1, 1]: x / 127.5 - 1 (0 -> -1, 255 -> 1 exactly)."""
    if x.dtype != np.uint8:
        raise ValueError(f"to_float: argument 'x' must be uint8, got dtype {x.dtype}")
    y = x.astype(dtype)
    y /= 127.5  # division by an exactly representable constant: one rounding, same as float64 then cast
    y -= 1
    return y


def to_uint8(x):
    """Floats in [-1, 1] (any shape) -> uint8 in [0, 255], clipped and rounded: the inverse of to_float."""
    return np.clip(np.rint((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def random_flip(x, rng, p=0.5):
    """Mirror each image of x (N, C, H, W) left-right with probability p; returns a new array of x's dtype.
    Draws N uniforms from rng (one per image, even when p is 0 or 1, so the rng advances the same way)."""
    if x.ndim != 4:
        raise ValueError(f"random_flip: argument 'x' must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    flip = rng.random(x.shape[0]) < p  # (N,)
    out = x.copy()
    out[flip] = x[flip][..., ::-1]  # W reversed: (n_flipped, C, H, W)
    return out


def _batch_bounds(n, batch_size, drop_last):
    stop = n - n % batch_size if drop_last else n
    return range(0, stop, batch_size)


def iterate_minibatches(x, y, batch_size, rng=None, shuffle=True, drop_last=True):
    """One epoch of (x[idx], y[idx]) minibatches. x (N, ...), y (N, ...) or None (then yields None for y).

    shuffle draws one permutation from rng (required then). drop_last skips the final short batch, so every batch
    has exactly batch_size items (the usual choice for training: constant shapes, no rarely-seen small batch).
    For exact resume across epochs use EpochSampler.
    """
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"iterate_minibatches: x has {n} items but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"iterate_minibatches: batch_size must be >= 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("iterate_minibatches: shuffle=True needs rng (a np.random.Generator)")
    idx = rng.permutation(n) if shuffle else np.arange(n)
    for s in _batch_bounds(n, batch_size, drop_last):
        b = idx[s:s + batch_size]
        yield x[b], (None if y is None else y[b])


def _plain(state):
    """A bit generator state with ndarrays turned into lists (MT19937 has one), so it can be JSON-encoded."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state


class EpochSampler:
    """Index batches over epochs of a dataset of n items, with a state that can be saved and restored exactly.

    sampler = EpochSampler(n, batch_size, rng)      # rng: a Generator used by nothing else
    idx = sampler.next_batch()                       # (batch_size,) int64 indices into the dataset
    state = sampler.state_dict()                     # plain dict (ints, str): JSON-serialisable
    EpochSampler(n, batch_size, other_rng).load_state_dict(state)   # continues with the same batches

    The state is (epoch, position in the epoch, generator state at the start of the epoch). Restoring sets the
    generator back to the start of the epoch and redraws the permutation, which is exact because each epoch's
    permutation is the only thing drawn from this generator. That is why it must not be shared with noise or
    augmentation: give it its own, e.g. `np.random.default_rng(seed)` or `rng.spawn(1)[0]`.
    """

    def __init__(self, n, batch_size, rng, shuffle=True, drop_last=True):
        if n < 1 or batch_size < 1 or (drop_last and batch_size > n):
            raise ValueError(f"EpochSampler: need n >= 1, batch_size >= 1 (and <= n with drop_last); got n={n}, "
                             f"batch_size={batch_size}")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rng = rng
        self.epoch = 0
        self._start_epoch(reset_position=True)

    @property
    def batches_per_epoch(self):
        return len(_batch_bounds(self.n, self.batch_size, self.drop_last))

    def _start_epoch(self, reset_position):
        self._epoch_rng_state = _plain(self.rng.bit_generator.state)
        self._perm = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if reset_position:
            self.position = 0

    def next_batch(self):
        """Indices (batch_size,) int64 of the next batch (the last one of an epoch is shorter if drop_last=False)."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        if self.position >= end:  # the epoch is used up: the next permutation is drawn only now
            self.epoch += 1
            self._start_epoch(reset_position=True)
        b = self._perm[self.position:self.position + self.batch_size]
        self.position += len(b)
        return b.astype(np.int64)

    def state_dict(self):
        return {"n": self.n, "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "epoch": self.epoch, "position": self.position, "rng_state": self._epoch_rng_state}

    def load_state_dict(self, state):
        for k in ("n", "batch_size", "shuffle", "drop_last"):
            if state[k] != getattr(self, k):
                raise ValueError(f"EpochSampler.load_state_dict: saved {k}={state[k]!r} but this sampler has "
                                 f"{k}={getattr(self, k)!r}; the dataset or batch settings changed since the "
                                 f"checkpoint")
        saved_bg = state["rng_state"]["bit_generator"]
        if saved_bg != type(self.rng.bit_generator).__name__:
            raise ValueError(f"EpochSampler.load_state_dict: saved state is for {saved_bg}, this sampler's "
                             f"generator is {type(self.rng.bit_generator).__name__}")
        self.rng.bit_generator.state = state["rng_state"]
        self.epoch = int(state["epoch"])
        self._start_epoch(reset_position=False)
        self.position = int(state["position"])
