"""Read and write `.safetensors` files in pure Python + NumPy, memory-mapped, with validation.

File layout (little-endian):

    [u64 N][N bytes of UTF-8 JSON header, right-padded with spaces][data area]

The header maps each tensor name to {"dtype": "F32", "shape": [320, 4, 3, 3], "data_offsets": [begin, end]} where
the offsets are byte positions *relative to the start of the data area*; tensors are C-order and little-endian.
An optional "__metadata__" entry maps str -> str. Nothing else is in the file: no code, no pickle.

Reading: `SafetensorsFile(path)` parses and validates the header only; `.get(name)` returns one tensor. With
mmap=True (the default) the file is memory-mapped and an aligned tensor is a zero-copy *read-only* view of the
page cache, so loading a 4 GB checkpoint costs 4 GB of (shared, evictable) page cache, not 8 GB of private memory.
A tensor whose byte offset is not a multiple of its item size is copied (the format does not promise
alignment; see the odd-aligned files in the wild cited in sd-reference.md §2.4). dtypes with no NumPy equivalent
(BF16, F8_E4M3, F8_E5M2) are decoded to float32, which is always a fresh writable array.

Writing: `save(tensors, path)` writes a temp file in the same folder, fsyncs it and renames it over `path`, so a
crash or a full disk never leaves a half-written checkpoint behind. The header is padded with spaces to a multiple
of 8 bytes (as the reference writer does) and the data area holds the tensors largest item size first, so every
tensor we write is aligned. Header keys keep the order of the given dict (the reference package sorts its
header; any order is valid).

Validation mirrors the reference Rust reader (`SafeTensors::read_metadata` + `Metadata::validate`; the tests check
each corrupt case against the installed safetensors 0.8 package):
the header length is checked against the file size *before* anything is allocated; tensors must tile the data area
exactly (sorted by offset: no gaps, no overlaps, no trailing bytes). We are stricter in one place: duplicate
names in the JSON header are refused (the reference silently keeps the last one).

References:
  format description  https://github.com/huggingface/safetensors/blob/v0.4.5/README.md#format
  reference reader    https://github.com/huggingface/safetensors/blob/v0.4.5/safetensors/src/tensor.rs
  bfloat16            https://en.wikipedia.org/wiki/Bfloat16_floating-point_format
  float8 (E4M3FN/E5M2) https://arxiv.org/abs/2209.05433 (Micikevicius et al., "FP8 formats for deep learning")
"""
import json
import mmap as _mmap
import os
import struct

import numpy as np

from ..backend import to_numpy
from ..errors import UserError

MAX_HEADER_BYTES = 100_000_000  # the reference reader's MAX_HEADER_SIZE: a larger header is corruption or an attack


class SafetensorsError(UserError, ValueError):
    """A .safetensors file is malformed (the message names the file and the problem), or save() got bad input."""


# ----------------------------------------------------------------------------------------------------------------
# dtypes

# safetensors dtype -> NumPy dtype (explicitly little-endian: the format is little-endian on every machine)
NUMPY_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Stored types NumPy cannot represent: read as raw unsigned ints, decoded to float32 (exact: every value fits).
RAW_DTYPES = {"BF16": np.dtype("<u2"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1")}
ITEMSIZE = {k: v.itemsize for k, v in {**NUMPY_DTYPES, **RAW_DTYPES}.items()}
# Valid in the reference but not read by minisd (sub-byte or exotic float formats); named in the error message.
UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
_FROM_NUMPY = {v: k for k, v in NUMPY_DTYPES.items()}


def bf16_to_float32(u16):
    """bfloat16 bit patterns (uint16 array, any shape) -> float32. Exact: bf16 is the top half of a float32."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x):
    """float32 array -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even (what torch does).

    Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest-even on the 16 dropped bits; a
    finite value may round up to inf, like in torch. NaN is handled apart: truncating a NaN whose payload lives only
    in the low 16 bits would give inf, so we keep the sign and exponent and force the quiet-NaN bit (0x0040).
    """
    u32 = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u32 + (np.uint32(0x7FFF) + ((u32 >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(u32.view(np.float32))
    if nan.any():
        rounded[nan] = ((u32[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def _e4m3fn_table():
    """float32 value of each of the 256 float8_e4m3fn bytes: 1 sign, 4 exponent (bias 7), 3 mantissa bits.
    'fn' = finite: no infinities; only S.1111.111 is NaN, so S.1111.110 = 448 is the largest value."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6,  # subnormals: 0.mmm * 2^(1-7)
                     (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, sign * value)
    return value.astype(np.float32)


_E4M3FN = _e4m3fn_table()


def float8_e4m3fn_to_float32(u8):
    """float8_e4m3fn bytes (uint8 array) -> float32, via a 256-entry table."""
    return _E4M3FN[np.asarray(u8, dtype=np.uint8)]


def float8_e5m2_to_float32(u8):
    """float8_e5m2 bytes -> float32. E5M2 is exactly the top byte of an IEEE float16 (same 5-bit exponent)."""
    return (np.asarray(u8, dtype=np.uint8).astype(np.uint16) << 8).view(np.float16).astype(np.float32)


_DECODERS = {"BF16": bf16_to_float32, "F8_E4M3": float8_e4m3fn_to_float32, "F8_E5M2": float8_e5m2_to_float32}


# ----------------------------------------------------------------------------------------------------------------
# reading

class _Entry:
    """One header record, validated: dtype name, shape tuple and absolute byte range in the file."""
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype, shape, begin, end):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _is_uint(v):
    return type(v) is int and v >= 0  # `type(...) is int` so that JSON true/false (bool) are refused


def _read_header(path, f, file_size):
    """Parse and validate the header. Returns ({name: _Entry} in header order, metadata dict, data start)."""
    def fail(problem):
        raise SafetensorsError(f"{path}: {problem}")

    if file_size < 8:
        fail(f"not a safetensors file: it is {file_size} bytes long, shorter than the 8-byte header length field "
             f"(truncated download?)")
    (n,) = struct.unpack("<Q", f.read(8))
    # Both checks come before reading the header, so a corrupt length can neither allocate nor read gigabytes.
    if n > MAX_HEADER_BYTES:
        fail(f"header length {n} bytes is larger than the {MAX_HEADER_BYTES}-byte limit: not a safetensors file "
             f"or corrupted")
    if 8 + n > file_size:
        fail(f"header length {n} bytes runs past the end of the {file_size}-byte file: truncated or not a "
             f"safetensors file")
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"header is not valid UTF-8 ({e})")

    def no_duplicates(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                fail(f"header names {k!r} twice")
            d[k] = v
        return d

    def no_constant(c):  # NaN / Infinity are not JSON; Python's json would accept them
        fail(f"header is not valid JSON (contains {c})")

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail(f"header must be a JSON object, got {type(header).__name__}")

    data_start = 8 + n
    data_size = file_size - data_start
    metadata = {}
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                fail("__metadata__ must map strings to strings, got " +
                     (repr(info)[:200] if not isinstance(info, dict) else
                      ", ".join(f"{k!r}: {type(v).__name__}" for k, v in info.items() if not isinstance(v, str))))
            metadata = dict(info)
            continue
        if not isinstance(info, dict):
            fail(f"tensor {name!r}: header entry must be an object, got {info!r}"[:300])
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ITEMSIZE:
            if dtype in UNSUPPORTED_DTYPES:
                fail(f"tensor {name!r} has dtype {dtype}, which minisd does not read (supported: "
                     f"{', '.join(ITEMSIZE)}); convert the file with the safetensors package first")
            fail(f"tensor {name!r} has unknown dtype {dtype!r} (expected one of {', '.join(ITEMSIZE)})")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            fail(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)
                or offsets[0] > offsets[1]):
            fail(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        nbytes = ITEMSIZE[dtype]
        for s in shape:
            nbytes *= s  # Python ints: no overflow, however absurd the shape
        if end - begin != nbytes:
            fail(f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its data_offsets "
                 f"[{begin}, {end}] span {end - begin}")
        if end > data_size:
            fail(f"tensor {name!r} ends at data byte {end} but the file holds only {data_size} bytes of data: "
                 f"the file is truncated (download it again)")
        entries[name] = _Entry(dtype, tuple(shape), data_start + begin, data_start + end)

    # The tensors must tile the data area: sorted by offset each starts where the previous ended, and the last
    # ends at the end of the file. This is what the reference checks; a hole or an overlap means corruption.
    pos = data_start
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap of {e.begin - pos} bytes"
            fail(f"tensor {name!r} starts at data byte {e.begin - data_start} and {what} (previous data ends at "
                 f"{pos - data_start}); tensors must tile the data area exactly")
        pos = e.end
    if pos != file_size:
        fail(f"{file_size - pos} bytes after the last tensor are not covered by the header (the file is corrupt or "
             f"not a safetensors file)")
    return entries, metadata, data_start


class SafetensorsFile:
    """Lazy reader: the header is parsed (and the file checked) on open, tensors are read on `get`.

        with SafetensorsFile("v1-5-pruned-emaonly.safetensors") as f:
            print(f.metadata, len(f.keys()))
            w = f.get("model.diffusion_model.input_blocks.0.0.weight")   # (320, 4, 3, 3) float32 view

    mmap=True: tensors are read-only views of the memory-mapped file when aligned (copy with np.array(t) to
    write); they stay valid after close(). mmap=False: each get() reads into a fresh, writable array.
    """

    def __init__(self, path, mmap=True):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        self._mm = None
        try:
            size = os.fstat(self._file.fileno()).st_size
            self._entries, self._metadata, self._data_start = _read_header(self.path, self._file, size)
            if mmap:
                self._mm = _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------------------------------ header queries
    def keys(self):
        """Tensor names in header order (for files minisd wrote: the order of the dict given to save())."""
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    @property
    def metadata(self):
        """The "__metadata__" str -> str dict ({} when the file has none)."""
        return dict(self._metadata)

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} ({len(self._entries)} tensors; first few: "
                           f"{list(self._entries)[:3]})") from None

    def shape(self, name):
        return self._entry(name).shape

    def dtype(self, name):
        """The *stored* dtype name ("F32", "BF16", ...). get() returns BF16/F8 tensors as float32."""
        return self._entry(name).dtype

    # ------------------------------------------------------------------------------------------ reading tensors
    def get(self, name):
        """The tensor `name` as an ndarray of its shape (see the class docstring for views vs copies)."""
        if self._file.closed:
            raise ValueError(f"{self.path}: file is closed")
        e = self._entry(name)
        raw_dtype = NUMPY_DTYPES.get(e.dtype) or RAW_DTYPES[e.dtype]
        count = (e.end - e.begin) // raw_dtype.itemsize
        if self._mm is not None:
            a = np.frombuffer(self._mm, dtype=raw_dtype, count=count, offset=e.begin)  # zero-copy, read-only
            if e.begin % raw_dtype.itemsize:
                a = a.copy()  # unaligned offset: an aligned copy (numpy math on unaligned data is slow or unsafe)
        else:
            a = np.empty(count, dtype=raw_dtype)
            self._file.seek(e.begin)
            got = self._file.readinto(a.view(np.uint8))
            if got != e.end - e.begin:
                raise SafetensorsError(f"{self.path}: tensor {name!r} could only read {got} of "
                                       f"{e.end - e.begin} bytes (was the file truncated after opening?)")
        if e.dtype in _DECODERS:
            a = _DECODERS[e.dtype](a)
        return a.reshape(e.shape)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # tensors still view the map: it is unmapped when the last of them is freed
            self._mm = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, names=None, mmap=True):
    """Read tensors from a .safetensors file -> {name: ndarray}, in header order (or the order of `names`).

    The whole header is validated first, so a corrupt file raises SafetensorsError and never yields a partial dict.
    names: only these tensors (KeyError for a missing one). mmap: see SafetensorsFile.
    """
    with SafetensorsFile(path, mmap=mmap) as f:
        return {n: f.get(n) for n in (f.keys() if names is None else names)}


def read_metadata(path):
    """Just the "__metadata__" dict of a file (the header is still fully validated)."""
    with SafetensorsFile(path, mmap=False) as f:
        return f.metadata


# ----------------------------------------------------------------------------------------------------------------
# writing

_CONVERTIBLE = ("F64", "F32", "F16", "BF16")  # stored dtypes save() can convert a float array to


def _plan(tensors, metadata, dtypes):
    """Check every argument before the file is touched. Returns [(name, array, stored dtype)] in dict order."""
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise SafetensorsError("save: metadata must be a dict of str -> str (convert numbers with str())")
    if isinstance(dtypes, dict):
        unknown = [k for k in dtypes if k not in tensors]
        if unknown:
            raise SafetensorsError(f"save: dtypes names tensors that are not being saved: {unknown[:5]}")
    elif isinstance(dtypes, str):
        if dtypes not in _CONVERTIBLE:
            raise SafetensorsError(f"save: dtypes={dtypes!r}; float32 arrays can be stored as "
                                   f"{', '.join(_CONVERTIBLE)}")
    elif dtypes is not None:
        raise SafetensorsError(f"save: dtypes must be None, a dtype name or a dict, got {type(dtypes).__name__}")
    plan = []
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"save: tensor names must be strings other than '__metadata__', got {name!r}")
        if not (hasattr(a, "dtype") and hasattr(a, "shape")):
            a = np.asarray(a)
        kind = np.dtype(a.dtype)
        natural = _FROM_NUMPY.get(kind.newbyteorder("<") if kind.byteorder == ">" else kind)
        if natural is None:
            raise SafetensorsError(f"save: tensor {name!r} has dtype {kind}, which safetensors cannot store "
                                   f"(supported: {', '.join(NUMPY_DTYPES)})")
        target = dtypes.get(name, natural) if isinstance(dtypes, dict) else natural
        if isinstance(dtypes, str) and natural == "F32":
            target = dtypes  # a single dtype name applies to the float32 arrays only
        if target != natural:
            if target not in _CONVERTIBLE or kind.kind != "f":
                raise SafetensorsError(f"save: cannot store tensor {name!r} ({kind}) as {target!r}; float arrays "
                                       f"can be stored as {', '.join(_CONVERTIBLE)}")
        plan.append((name, a, target))
    return plan


def _stored_bytes(a, target):
    """The little-endian, C-contiguous uint8 view of array `a` converted to the stored dtype `target`."""
    a = to_numpy(a)  # a CuPy array is copied to the host here, one tensor at a time
    if target == "BF16":
        # float64 goes through float32 first, so it is rounded twice (f64 -> f32 -> bf16); torch rounds once.
        # The two differ only for values within 2^-24 relative of a bf16 tie; float32 inputs round exactly once.
        out = float32_to_bf16(a.astype(np.float32))
    else:
        with np.errstate(over="ignore"):  # float32 -> F16 overflow to inf is the documented behaviour
            out = np.ascontiguousarray(a, dtype=NUMPY_DTYPES[target])
    return out.reshape(-1).view(np.uint8)


def save(tensors, path, metadata=None, dtypes=None):
    """Write {name: array} to `path` as .safetensors, atomically.

    tensors: mapping name -> array (NumPy, CuPy or anything np.asarray accepts; any layout or byte order).
    metadata: optional {str: str}, stored as "__metadata__".
    dtypes: None (keep each array's dtype), a name such as "BF16" or "F16" (applies to every float32 array), or
      a dict {name: "BF16" | "F16" | "F32" | "F64"} for chosen float tensors. BF16 rounds to nearest-even, keeps NaN.
    The file appears at `path` only once complete (temp file in the same folder + fsync + rename); on error the
    temp file is removed and an existing `path` is left untouched.
    """
    plan = _plan(tensors, metadata, dtypes)
    # Data layout: largest item size first (stable, so dict order within a size). With the header padded to a
    # multiple of 8 every offset is then a multiple of its tensor's item size, so readers get aligned views.
    layout = sorted(plan, key=lambda p: -ITEMSIZE[p[2]])
    header, pos = {}, 0
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offsets = {}
    for name, a, target in layout:
        nbytes = ITEMSIZE[target] * int(np.prod(a.shape, dtype=object))
        offsets[name] = [pos, pos + nbytes]
        pos += nbytes
    for name, a, target in plan:  # header in the caller's order
        header[name] = {"dtype": target, "shape": [int(s) for s in a.shape], "data_offsets": offsets[name]}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # pad with spaces (valid JSON whitespace) so the data area starts 8-aligned

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as a plain open() would
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name, a, target in layout:
                f.write(_stored_bytes(a, target))  # one tensor converted at a time: peak extra memory = 1 tensor
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every OS/filesystem allows fsync on a folder)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
