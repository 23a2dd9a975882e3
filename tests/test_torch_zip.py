"""weights_convert.torch_zip: torch.save files read without torch, compared with torch; malicious pickles refused
(and proven not to run); damaged files give TorchFileError.

Malicious and damaged pickles are assembled here from opcodes (pickle.GLOBAL, pickle.REDUCE, ...), never shipped
as binaries. The "positive controls" run the same bytes through the standard pickle module to prove each payload
really would execute, so the "nothing ran" assertions can fail.
"""
import collections
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from weights_convert import torch_zip
from weights_convert.torch_zip import InertClass, InertObject, TorchDtype, TorchFileError, UnsafeCheckpointError, \
    load_torch_file

# ----------------------------------------------------------------------------------------------------------------
# a tiny pickle assembler (protocol 2 opcodes)


def g(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def s(text):
    b = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def i(v):
    return pickle.BININT + struct.pack("<i", v)


def tup(*items):
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def call(fn, *args):
    return fn + tup(*args) + pickle.REDUCE


def dct(**items):
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(s(k) + v for k, v in items.items()) + pickle.SETITEMS


def pkl(body):
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def pid(key, numel, cls="FloatStorage"):
    return tup(s("storage"), g("torch", cls), s(key), s("cpu"), i(numel)) + pickle.BINPERSID


def tensor(key, numel, offset, size, stride, cls="FloatStorage"):
    return call(g("torch._utils", "_rebuild_tensor_v2"), pid(key, numel, cls), i(offset), tup(*map(i, size)),
                tup(*map(i, stride)), pickle.NEWFALSE, call(g("collections", "OrderedDict")))


def write_zip(path, data_pkl, storages=None, folder="archive", compress=zipfile.ZIP_STORED, extra=None):
    """A torch-style zip: <folder>/data.pkl, <folder>/data/<key>, <folder>/byteorder, <folder>/version."""
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        if data_pkl is not None:
            z.writestr(f"{folder}/data.pkl", data_pkl)
        z.writestr(f"{folder}/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"{folder}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            z.writestr(f"{folder}/{name}", raw)
        z.writestr(f"{folder}/version", "3\n")
    return path


F32x12 = np.arange(12, dtype=np.float32).tobytes()


def test_assembler_matches_torch(tmp_path):
    """The hand-assembled good file loads in torch with the values we expect (validates the helpers above)."""
    torch = pytest.importorskip("torch")
    path = write_zip(tmp_path / "hand.pt", pkl(dct(w=tensor("0", 12, 2, (2, 3), (1, 2)))), {"0": F32x12})
    ref = torch.load(path, weights_only=True)["w"].numpy()
    np.testing.assert_array_equal(ref, np.arange(12, dtype=np.float32)[2:8].reshape(3, 2).T)
    out = load_torch_file(path)["w"]
    np.testing.assert_array_equal(out, ref)


# ----------------------------------------------------------------------------------------------------------------
# files written by torch

def _all_dtypes(torch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen) * 10
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(), "c64": torch.complex(x, -x),
        "i64": torch.arange(-7, 8).reshape(3, 5) * 10 ** 12, "i32": torch.arange(-7, 8, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16), "i8": torch.arange(-128, 128, 37, dtype=torch.int8),
        "u8": torch.arange(0, 256, 17, dtype=torch.uint8), "bool": x > 0,
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "empty_i": torch.zeros(2, 0, dtype=torch.int64),
    }


def _v3_dtypes(torch):
    """dtypes without a legacy storage class: torch >= 2.1 writes them with _rebuild_tensor_v3 + UntypedStorage."""
    every_byte = torch.arange(256, dtype=torch.uint8)
    return {"u16": torch.tensor([0, 1, 65535], dtype=torch.uint16), "u32": torch.tensor([7, 2 ** 32 - 1],
                                                                                          dtype=torch.uint32),
            "u64": torch.tensor([3, 2 ** 63 + 5], dtype=torch.uint64),
            "e4m3": every_byte.clone().view(torch.float8_e4m3fn), "e5m2": every_byte.clone().view(torch.float8_e5m2)}


def _np(torch, t):
    """The NumPy array we expect for torch tensor t: bf16/fp8 widened to float32, everything else as is."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return t.float().numpy()
    return t.numpy()


def _assert_same(torch, out, ref):
    if isinstance(ref, torch.Tensor):
        want = _np(torch, ref)
        assert isinstance(out, np.ndarray) and out.dtype == want.dtype and out.shape == want.shape
        np.testing.assert_array_equal(out, want)  # exact (NaN == NaN here)
        assert out.flags.c_contiguous
    elif isinstance(ref, dict):
        assert type(out) is type(ref) and list(out) == list(ref)
        for k in ref:
            _assert_same(torch, out[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(out) is type(ref) and len(out) == len(ref)
        for a, b in zip(out, ref):
            _assert_same(torch, a, b)
    else:
        assert out == ref and type(out) is type(ref)


@pytest.mark.parametrize("legacy", [False, True])
def test_every_dtype(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    t = _all_dtypes(torch)
    if not legacy:
        t.update(_v3_dtypes(torch))
    path = tmp_path / "d.pt"
    torch.save(t, path, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(path) == (not legacy)
    _assert_same(torch, load_torch_file(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("legacy", [False, True])
def test_views_shared_storage_parameters_and_nesting(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    half = torch.arange(24, dtype=torch.float16).reshape(4, 6)
    obj = {
        "base": base,
        "transposed": base.transpose(0, 2),  # non-contiguous
        "permuted": base.permute(1, 2, 0),
        "sliced": base[1:, ::2, 1:4],  # offset + steps
        "column": base[:, :, 3],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0 (overlapping)
        "overlap": torch.arange(10.0).as_strided((4, 3), (2, 1)),  # rows overlap in storage
        "half_t": half.t(), "half_row": half[2],
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "nested": {"list": [half[1:3], 5, "text", (base[0, 0], None)], "tuple": (1.5, True)},
    }
    path = tmp_path / "v.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, weights_only=True)
    ref["param"] = ref["param"].detach()
    out = load_torch_file(path)
    _assert_same(torch, out, ref)
    # contiguous views of one storage share memory, like in torch; mmap views are read-only
    assert np.shares_memory(out["base"], out["column"]) is False  # "column" is strided -> a copy
    assert np.shares_memory(out["base"], out["nested"]["list"][3][0])
    assert not out["base"].flags.writeable and out["transposed"].flags.writeable
    private = load_torch_file(path, mmap=False)
    assert private["base"].flags.writeable
    _assert_same(torch, private, ref)


def test_module_state_dict_ordered_dict_and_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Linear(4, 2))
    path = tmp_path / "sd.pth"
    torch.save(net.state_dict(), path)
    out = load_torch_file(path)
    ref = torch.load(path, weights_only=True)
    assert type(out) is collections.OrderedDict and list(out) == list(ref)
    _assert_same(torch, out, ref)
    assert out._metadata == ref._metadata  # BUILD restored the state_dict's version metadata
    assert out["1.num_batches_tracked"].dtype == np.int64


def test_lightning_style_checkpoint(tmp_path, monkeypatch):
    """numpy-scalar global_step, a callback *class* used as a dict key and a callback object (NEWOBJ + BUILD),
    torch dtype / device / Size values, a set, and a tensor carrying a Python attribute."""
    torch = pytest.importorskip("torch")
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:  # a fake Lightning, only so that pickle can *write* the class reference
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "epoch=3.ckpt"
            self.best_model_score = torch.tensor(0.25)

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    tagged = torch.ones(2)
    tagged.note = "python attribute"  # makes torch use _rebuild_from_type_v2
    ckpt = {"epoch": 3, "global_step": np.int64(470000), "lr": np.float32(1e-4),
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "monitor": None}},
            "callback_obj": ModelCheckpoint(),
            "state_dict": collections.OrderedDict(w=torch.randn(3, 3)),
            "dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2, 3]), "set": {1, 2},
            "tagged": tagged}
    path = tmp_path / "pl.ckpt"
    torch.save(ckpt, path)
    for n in names:  # the loader must not need (or import) Lightning
        monkeypatch.delitem(sys.modules, n)
    out = load_torch_file(path)
    assert out["epoch"] == 3 and out["pytorch-lightning_version"] == "1.4.2"
    assert type(out["global_step"]) is np.int64 and out["global_step"] == 470000
    assert type(out["lr"]) is np.float32 and out["lr"] == np.float32(1e-4)
    (cls, cb_state), = out["callbacks"].items()
    assert cls == InertClass(names[-1] + ".ModelCheckpoint")
    assert cb_state["best_model_score"] == np.float32(0.25) and cb_state["monitor"] is None
    obj = out["callback_obj"]
    assert isinstance(obj, InertObject) and obj.class_name.endswith("ModelCheckpoint")
    assert obj.state["best_model_path"] == "epoch=3.ckpt" and obj.state["best_model_score"].shape == ()
    np.testing.assert_array_equal(out["state_dict"]["w"], ckpt["state_dict"]["w"].numpy())
    assert out["dtype"] == TorchDtype("float16") and out["device"] == "cpu" and out["size"] == (2, 3)
    assert out["set"] == {1, 2}
    np.testing.assert_array_equal(out["tagged"], [1.0, 1.0])
    assert "numpy._core.multiarray\nscalar" in pickle_text(path)


def pickle_text(path):
    with zipfile.ZipFile(path) as z:
        return next(z.read(n) for n in z.namelist() if n.endswith("data.pkl")).decode("latin1")


def test_numpy_arrays_in_checkpoint(tmp_path):
    """Plain NumPy arrays pickled inside a checkpoint (numpy _reconstruct + BUILD), C and Fortran order."""
    torch = pytest.importorskip("torch")
    arrays = {"i16_f": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)), "b": np.array([True, False]),
              "f64": np.linspace(0, 1, 7), "be": np.arange(4, dtype=">f4"), "scalar_arr": np.array(2.5),
              "empty": np.zeros((0, 3), np.float32)}
    torch.save(arrays, tmp_path / "np.pt")
    out = load_torch_file(tmp_path / "np.pt")
    for k, a in arrays.items():
        assert out[k].shape == a.shape and out[k].dtype == a.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(out[k], a)
    torch.save({"obj": np.array([{"a": 1}], dtype=object)}, tmp_path / "obj.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(tmp_path / "obj.pt")


def test_numpy1_scalar_name(tmp_path):
    """NumPy 1.x wrote numpy.core.multiarray.scalar (2.x: numpy._core); both decode the same."""
    gs = call(g("numpy.core.multiarray", "scalar"), call(g("numpy", "dtype"), s("i8"), pickle.NEWFALSE,
                                                         pickle.NEWTRUE)
              + tup(i(3), s("<"), pickle.NONE, pickle.NONE, pickle.NONE, i(-1), i(-1), i(0)) + pickle.BUILD,
              call(g("_codecs", "encode"), s(struct.pack("<q", 470000).decode("latin1")), s("latin1")))
    path = write_zip(tmp_path / "np1.ckpt", pkl(dct(global_step=gs)))
    assert pickle.loads(pkl(dct(global_step=gs)))["global_step"] == 470000  # what real unpickling gives
    out = load_torch_file(path)["global_step"]
    assert type(out) is np.int64 and out == 470000


def test_big_endian_and_compressed_archives(tmp_path):
    """byteorder=big (written by torch on big-endian machines): storages are swapped back. A deflated member
    (torch never writes one) is inflated instead of memory-mapped. Rewritten zips also have unaligned data."""
    torch = pytest.importorskip("torch")
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
        t = {"a": torch.randn(4, 3).to(dtype), "b": torch.randn(5).to(dtype).t()}
        src = tmp_path / "le.pt"
        torch.save(t, src)
        with zipfile.ZipFile(src) as z:
            members = {n: z.read(n) for n in z.namelist()}
        big = tmp_path / "be.pt"
        with zipfile.ZipFile(big, "w") as z:
            for n, raw in members.items():
                if n.endswith("/byteorder"):
                    raw = b"big"
                elif "/data/" in n:
                    raw = np.frombuffer(raw, f"<u{width}").byteswap().tobytes()
                z.writestr(n, raw)
        out = load_torch_file(big)
        for k in t:
            np.testing.assert_array_equal(out[k], _np(torch, t[k]))
            assert out[k].dtype.isnative
        deflated = tmp_path / "deflated.pt"
        with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for n, raw in members.items():
                z.writestr(n, raw)
        out = load_torch_file(deflated)
        for k in t:
            np.testing.assert_array_equal(out[k], _np(torch, t[k]))


def test_old_and_rare_spellings(tmp_path):
    """_rebuild_tensor (4 arguments, old torch), a GPU-saved storage (torch.cuda.*Storage, location cuda:0),
    a Parameter with Python attributes (_rebuild_parameter_with_state) and a storage saved on its own."""
    cuda_pid = tup(s("storage"), g("torch.cuda", "HalfStorage"), s("1"), s("cuda:0"), i(6)) + pickle.BINPERSID
    body = dct(
        old=call(g("torch._utils", "_rebuild_tensor"), pid("0", 12, "FloatStorage"), i(1), tup(i(2), i(2)),
                 tup(i(1), i(2))),
        gpu=call(g("torch._utils", "_rebuild_tensor_v2"), cuda_pid, i(0), tup(i(6)), tup(i(1)), pickle.NEWFALSE,
                 call(g("collections", "OrderedDict"))),
        storage=pid("0", 12))
    half = np.arange(6, dtype=np.float16)
    path = write_zip(tmp_path / "old.pt", pkl(body), {"0": F32x12, "1": half.tobytes()})
    out = load_torch_file(path)
    np.testing.assert_array_equal(out["old"], [[1.0, 3.0], [2.0, 4.0]])
    np.testing.assert_array_equal(out["gpu"], half)
    np.testing.assert_array_equal(out["storage"], np.arange(12, dtype=np.float32))
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.randn(2, 2))
    p.tag = "attr"
    torch.save({"p": p}, tmp_path / "p.pt")
    assert "_rebuild_parameter_with_state" in pickle_text(tmp_path / "p.pt")
    np.testing.assert_array_equal(load_torch_file(tmp_path / "p.pt")["p"], p.detach().numpy())


def test_any_top_folder_name(tmp_path):
    path = write_zip(tmp_path / "f.bin", pkl(dct(w=tensor("0", 12, 0, (12,), (1,)))), {"0": F32x12},
                     folder="some model-name_v2")
    np.testing.assert_array_equal(load_torch_file(path)["w"], np.arange(12, dtype=np.float32))


# ----------------------------------------------------------------------------------------------------------------
# real files from ../shared

REAL_FILES = ["taesd_family/taef2_encoder.pth", "taesd_family/taef2_decoder.pth", "taesd_family/taesana_encoder.pth",
              "textual_inversion_birb_style/learned_embeds.bin", "a1111_vae_approx/model.pt"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files_match_torch(shared_dir, name):
    torch = pytest.importorskip("torch")
    path = shared_dir / "data" / "weights" / name
    ref = torch.load(path, weights_only=True, map_location="cpu")
    out = load_torch_file(path)
    assert list(out) == list(ref) and len(out) > 0
    for k, v in ref.items():
        assert out[k].shape == tuple(v.shape) and out[k].dtype == _np(torch, v).dtype, k
        np.testing.assert_array_equal(out[k], _np(torch, v))


# ----------------------------------------------------------------------------------------------------------------
# malicious pickles: refused, and nothing runs


def _payloads(marker):
    m = str(marker)
    py = f"open({m!r}, 'w').close()"
    return {
        "os.system": call(g("os", "system"), s(f"touch '{m}'")),
        "posix.system": call(g("posix", "system"), s(f"touch '{m}'")),
        "builtins.eval": call(g("builtins", "eval"), s(py)),
        "builtins.exec": call(g("builtins", "exec"), s(py)),
        "subprocess.Popen": call(g("subprocess", "Popen"), tup(s("touch"), s(m))),
        "foo.Bar": call(g("foo", "Bar")),
        # protocol-4 STACK_GLOBAL spelling of builtins.exec
        "stack_global": s("builtins") + s("exec") + pickle.STACK_GLOBAL + tup(s(py)) + pickle.REDUCE,
        # protocol-0 INST: imports and calls in one opcode
        "inst": pickle.MARK + s(py) + b"ibuiltins\nexec\n",
        # __builtin__ (Python 2 name, mapped to builtins by the stdlib's fix_imports)
        "py2_builtin": call(g("__builtin__", "eval"), s(py)),
    }


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "foo.Bar", "stack_global", "inst", "py2_builtin"])
def test_malicious_globals_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    # hide the payload after a valid tensor, inside a valid torch zip layout
    data = pkl(dct(ok=tensor("0", 12, 0, (12,), (1,)), evil=payload))
    path = write_zip(tmp_path / "evil.pt", data, {"0": F32x12})
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as e:
        load_torch_file(path)
    assert str(path) in str(e.value)
    if name not in ("stack_global", "inst", "py2_builtin"):
        assert name in str(e.value)  # the message names the global
    assert not marker.exists()
    # the same file in the legacy layout (payload in the main pickle, or even in the magic-number pickle)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pkl(payload))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(legacy)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "stack_global", "inst"])
def test_positive_control_payloads_do_run_under_pickle(tmp_path, name):
    """Proof that the payloads above are live: the standard unpickler executes them (creating the marker)."""
    marker = tmp_path / "pwned"
    try:
        pickle.loads(pkl(_payloads(marker)[name]))
    except Exception:
        pass  # exec/eval return None, which may break the rest of the pickle; the side effect has happened
    assert marker.exists()


def _tensor_global():
    return g("torch._utils", "_rebuild_tensor_v2")


MISUSE = {
    # REDUCE on allowed-but-not-callable objects, or on things built from allowed objects
    "reduce_on_storage_class": call(g("torch", "FloatStorage"), i(3)),
    "reduce_on_dtype": call(g("torch", "float32")),
    "reduce_on_result": call(call(g("collections", "OrderedDict")), s("x")),
    # BUILD that would setattr on our own rebuild function (could change its defaults for later loads)
    "build_on_function": _tensor_global() + tup(pickle.NONE, dct(__defaults__=tup(i(1)))) + pickle.BUILD,
    "build_on_dict_slots": call(g("collections", "OrderedDict")) + tup(pickle.NONE, dct(x=i(1))) + pickle.BUILD,
    # NEWOBJ / OBJ on an allowed callable that is not an inert class
    "newobj_ordered_dict": g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
    "obj_opcode": pickle.MARK + g("collections", "OrderedDict") + pickle.OBJ,
    "rebuild_from_type_unknown_func": call(g("torch._tensor", "_rebuild_from_type_v2"), g("torch", "float32"),
                                           g("torch", "Tensor"), pickle.EMPTY_TUPLE, pickle.EMPTY_DICT),
    "numpy_object_dtype": call(g("numpy", "dtype"), s("O"), pickle.NEWFALSE, pickle.NEWTRUE),
    "codecs_other_encoding": call(g("_codecs", "encode"), s("x"), s("rot13")),
}


@pytest.mark.parametrize("name", sorted(MISUSE))
def test_misuse_of_allowed_objects_refused(tmp_path, name):
    before = torch_zip._rebuild_tensor_v2.__defaults__
    path = write_zip(tmp_path / "m.pt", pkl(dct(x=MISUSE[name])))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)
    assert torch_zip._rebuild_tensor_v2.__defaults__ == before


# ----------------------------------------------------------------------------------------------------------------
# damaged files: TorchFileError (and not UnsafeCheckpointError)

def _good(tmp_path):
    return write_zip(tmp_path / "good.pt", pkl(dct(w=tensor("0", 12, 0, (3, 4), (4, 1)))), {"0": F32x12})


def _damage(tmp_path, case):
    good = _good(tmp_path)
    raw = good.read_bytes()
    bad = tmp_path / f"{case}.pt"
    body = {
        "offset_past_storage": tensor("0", 12, 10, (3,), (1,)),
        "stride_past_storage": tensor("0", 12, 0, (3, 4), (5, 1)),
        "negative_offset": tensor("0", 12, -1, (2,), (1,)),
        "negative_stride": tensor("0", 12, 11, (2,), (-1,)),
        "size_stride_mismatch": tensor("0", 12, 0, (3, 4), (4,)),
        "numel_larger_than_record": tensor("0", 13, 0, (13,), (1,)),
        "expansion_bomb": tensor("0", 12, 0, (1 << 30, 1 << 10), (0, 0)),
        "missing_storage": tensor("7", 12, 0, (12,), (1,)),
        "storage_not_from_pid": call(_tensor_global(), s("0"), i(0), tup(i(1)), tup(i(1)), pickle.NEWFALSE,
                                     call(g("collections", "OrderedDict"))),
        "bad_pid": call(_tensor_global(), tup(s("storage"), s("x")) + pickle.BINPERSID, i(0), tup(i(1)),
                        tup(i(1)), pickle.NEWFALSE, call(g("collections", "OrderedDict"))),
        "unsupported_dtype": call(g("torch._utils", "_rebuild_tensor_v3"), pid("0", 12, "ByteStorage"), i(0),
                                  tup(i(4)), tup(i(1)), pickle.NEWFALSE, call(g("collections", "OrderedDict")),
                                  g("torch", "qint8")),
    }
    if case in body:
        return write_zip(bad, pkl(dct(w=body[case])), {"0": F32x12})
    if case == "truncated_zip":
        bad.write_bytes(raw[:len(raw) // 2])
    elif case == "truncated_tail":
        bad.write_bytes(raw[:-10])
    elif case == "not_a_checkpoint":
        bad.write_bytes(b"hello, this is text and not a checkpoint\n")
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "missing_data_pkl":
        write_zip(bad, None, {"0": F32x12})
    elif case == "short_storage_record":
        write_zip(bad, pkl(dct(w=tensor("0", 12, 0, (12,), (1,)))), {"0": F32x12[:40]})
    elif case == "unsupported_protocol":
        write_zip(bad, b"\x80\x09" + pickle.NONE + pickle.STOP)
    elif case == "unsupported_opcode":
        write_zip(bad, pkl(b"\xff"))
    elif case == "truncated_pickle":
        write_zip(bad, pkl(dct(w=tensor("0", 12, 0, (12,), (1,))))[:-30], {"0": F32x12})
    elif case == "ext_opcode":
        write_zip(bad, pkl(pickle.EXT1 + b"\x01"))
    elif case == "bad_byteorder":
        with zipfile.ZipFile(good) as z:
            members = {n: z.read(n) for n in z.namelist()}
        with zipfile.ZipFile(bad, "w") as z:
            for n, r in members.items():
                z.writestr(n, b"middle" if n.endswith("byteorder") else r)
    elif case == "plain_pickle":
        bad.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    elif case == "tar":
        import tarfile
        with tarfile.open(bad, "w") as t:
            t.add(good, arcname="storages")
    return bad


DAMAGE = {
    "offset_past_storage": "holds only 12", "stride_past_storage": "holds only 12",
    "negative_offset": "non-negative", "negative_stride": "non-negative", "size_stride_mismatch": "different lengths",
    "numel_larger_than_record": "truncated or corrupt", "expansion_bomb": "refusing to allocate",
    "missing_storage": "'archive/data/7' is missing", "storage_not_from_pid": "persistent id",
    "bad_pid": "persistent id", "unsupported_dtype": "not supported", "truncated_zip": "damaged zip",
    "truncated_tail": "damaged zip", "not_a_checkpoint": "not a torch checkpoint", "empty": "empty",
    "missing_data_pkl": "no <folder>/data.pkl", "short_storage_record": "has 40 bytes",
    "unsupported_protocol": "unsupported pickle protocol", "unsupported_opcode": "unsupported pickle opcode",
    "truncated_pickle": "corrupt pickle", "ext_opcode": "EXT", "bad_byteorder": "byteorder",
    "plain_pickle": "magic number", "tar": "tar format",
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_files(tmp_path, case):
    path = _damage(tmp_path, case)
    for mmap in (True, False):
        with pytest.raises(TorchFileError, match=DAMAGE[case]) as e:
            load_torch_file(path, mmap=mmap)
        assert not isinstance(e.value, UnsafeCheckpointError)
        assert str(path) in str(e.value) and isinstance(e.value, ValueError)


def test_legacy_truncated_and_mismatched(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "l.pt"
    torch.save({"a": torch.arange(100.0), "b": torch.ones(3, dtype=torch.int64)}, path,
               _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:-20])
    with pytest.raises(TorchFileError, match="truncated"):
        load_torch_file(tmp_path / "cut.pt")
    # the element count written before the first storage disagrees with the pickle's numel
    f = io.BytesIO(raw)
    for _ in range(5):  # skip magic, protocol, sys_info, object, key list without unpickling anything
        for _op in pickletools.genops(f):
            pass
    pos = f.tell()
    count = struct.unpack("<q", raw[pos:pos + 8])[0]
    bad = raw[:pos] + struct.pack("<q", count + 1) + raw[pos + 8:]
    (tmp_path / "count.pt").write_bytes(bad)
    with pytest.raises(TorchFileError, match="elements on disk"):
        load_torch_file(tmp_path / "count.pt")


# ----------------------------------------------------------------------------------------------------------------
# memory: storages are memory-mapped, so a full load costs ~1x the file

_MEMORY_SCRIPT = """
import sys
import numpy as np
from weights_convert.torch_zip import load_torch_file

def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

base = peak_rss()
tensors = load_torch_file(sys.argv[1])
total = sum(float(np.sum(t, dtype=np.float64)) for t in tensors.values())  # touches every value
print(base, peak_rss(), total)
"""


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True])
def test_full_load_peak_memory(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read the peak RSS of the child process")
    path = tmp_path / "big.pt"
    torch.save({f"w{k}": torch.full((32 * 1024 * 1024,), k + 0.5) for k in range(8)}, path,  # 8 x 128 MiB fp32
               _use_new_zipfile_serialization=not legacy)
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True)
    base, peak, total = (float(v) for v in out.stdout.split())
    assert total == sum((k + 0.5) * 32 * 1024 * 1024 for k in range(8))
    print(f"legacy={legacy}: file {size / 2**30:.3f} GiB, extra peak RSS {(peak - base) / size:.3f}x the file")
    assert peak - base < 1.2 * size
