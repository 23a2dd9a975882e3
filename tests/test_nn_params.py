"""nn.Params: strict/non-strict loading and its messages, storage vs compute dtype, gradients, init rules.

The init bounds are checked against PyTorch's own formula (kaiming_uniform_ with a=sqrt(5) for weights,
1/sqrt(fan_in) for biases, fan_in from torch.nn.init._calculate_fan_in_and_fan_out), not against minisd's.
"""
import math
import re

import numpy as np
import pytest

from minisd.nn import Params, init_params

SHAPES = {"a.weight": (2, 3), "a.bias": (2,), "norm.weight": (4,), "norm.bias": (4,)}


def _params(rng, dtype=np.float32, **kw):
    return Params({k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}, **kw)


# ----------------------------------------------------------------------------------------------------------------
# load_state_dict

def test_strict_load_lists_missing_unexpected_and_misshaped(rng):
    P = _params(rng)
    before = {k: v.copy() for k, v in P.data.items()}
    state = {"a.weight": np.zeros((3, 2), np.float32), "norm.weight": np.zeros(4, np.float32),
             "extra.weight": np.zeros(1, np.float32)}
    expected = ("load_state_dict: 2 missing (a.bias, norm.bias); 1 unexpected (extra.weight); "
                "1 with the wrong shape (a.weight: expected (2, 3), got (3, 2)). Is this checkpoint for the same "
                "model and config?")
    with pytest.raises(ValueError, match=re.escape(expected)):
        P.load_state_dict(state)
    for k in SHAPES:  # nothing was loaded: the checks run before any assignment
        np.testing.assert_array_equal(P.data[k], before[k])


def test_strict_load_truncates_long_lists(rng):
    P = Params({f"w{i}": np.zeros(1, np.float32) for i in range(8)})
    with pytest.raises(ValueError, match=re.escape("load_state_dict: 7 missing (w1, w2, w3, w4, w5, ... (2 more))")):
        P.load_state_dict({"w0": np.ones(1, np.float32)})


def test_non_strict_load(rng):
    P = _params(rng)
    kept = P.data["a.bias"].copy()
    new_w = rng.standard_normal((2, 3)).astype(np.float32)
    P.add_grad("a.bias", np.ones(2, np.float32))
    P.load_state_dict({"a.weight": new_w, "norm.weight": np.ones(4, np.float32), "unused": np.zeros(9)},
                      strict=False)
    np.testing.assert_array_equal(P["a.weight"], new_w)
    np.testing.assert_array_equal(P["a.bias"], kept)  # missing: keeps its value
    assert "unused" not in P and len(P) == 4  # unexpected: ignored
    assert P.grads == {}  # loading forgets gradients
    with pytest.raises(ValueError, match=re.escape("1 with the wrong shape (norm.bias: expected (4,), got (5,))")):
        P.load_state_dict({"norm.bias": np.zeros(5, np.float32)}, strict=False)  # shapes are still checked


def test_load_dtypes(rng):
    P = _params(rng)
    state = {k: rng.standard_normal(s) for k, s in SHAPES.items()}  # float64 arrays
    P.load_state_dict(state, dtype=np.float16)
    for k in SHAPES:
        assert P.data[k].dtype == np.float16  # fp16 storage (half the memory) ...
        assert P[k].dtype == np.float32  # ... fp32 compute, converted on access
        np.testing.assert_array_equal(P[k], state[k].astype(np.float16).astype(np.float32))
    P.load_state_dict({k: np.arange(int(np.prod(s))).reshape(s) for k, s in SHAPES.items()})  # int64 arrays
    assert all(P.data[k].dtype == np.float32 for k in SHAPES)  # non-float storage -> compute dtype
    P.load_state_dict({k: v.astype(np.float64) for k, v in state.items()})  # float64 kept as given
    assert P.data["a.weight"].dtype == np.float64 and P["a.weight"].dtype == np.float32


def test_load_keeps_arrays_and_state_dict_returns_storage(rng):
    P = _params(rng)
    w = np.zeros((2, 3), np.float32)
    P.load_state_dict({**P.state_dict(), "a.weight": w})
    assert P.data["a.weight"] is w  # no copy (documented: memory-mapped checkpoints stay mapped)
    sd = P.state_dict()
    assert list(sd) == list(SHAPES) and all(sd[k] is P.data[k] for k in SHAPES)


# ----------------------------------------------------------------------------------------------------------------
# dtypes and gradients

def test_fp16_storage_fp32_compute(rng):
    P = _params(rng).astype(np.float16)
    for k in SHAPES:
        assert P.data[k].dtype == np.float16 and P[k].dtype == np.float32
    P64 = Params({"w": np.ones(3, np.float32)}, compute_dtype=np.float64)
    assert P64["w"].dtype == np.float64 and P64.data["w"].dtype == np.float32


def test_astype(rng):
    P = _params(rng)
    P.add_grad("a.bias", np.ones(2, np.float32))
    ref = {k: v.astype(np.float64) for k, v in P.data.items()}
    assert P.astype(np.float64) is P
    assert P.grads == {}  # gradients of the old storage are dropped
    for k in SHAPES:
        assert P.data[k].dtype == np.float64
        np.testing.assert_array_equal(P.data[k], ref[k])
    assert P.to(np) is P and P.data["a.weight"].dtype == np.float64


def test_add_grad_accumulates_and_zero_grad(rng):
    P = _params(rng)
    g1, g2 = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    P.add_grad("a.weight", g1.copy())
    np.testing.assert_array_equal(P.grads["a.weight"], g1)
    g2_before = g2.copy()
    P.add_grad("a.weight", g2)  # the parameter is used twice: gradients add
    np.testing.assert_array_equal(P.grads["a.weight"], g1 + g2)
    np.testing.assert_array_equal(g2, g2_before)  # the second array was not modified
    assert set(P.grads) == {"a.weight"}  # only parameters that got a gradient appear
    P.zero_grad()
    assert P.grads == {}
    with pytest.raises(KeyError, match="'nope' is not a parameter"):
        P.add_grad("nope", g1)
    with pytest.raises(ValueError, match=re.escape("gradient for 'a.weight' has shape (3, 2), parameter has (2, 3)")):
        P.add_grad("a.weight", g1.T)
    with pytest.raises(ValueError, match="gradient for 'a.weight' has dtype float64, expected the compute dtype "
                                         "float32"):
        P.add_grad("a.weight", g1.astype(np.float64))


def test_mapping_access(rng):
    P = _params(rng)
    assert list(P) == list(SHAPES) and list(P.keys()) == list(SHAPES) and len(P) == 4
    assert "a.bias" in P and "b" not in P
    assert P.shapes() == SHAPES
    assert P.num_parameters() == 6 + 2 + 4 + 4 and P.num_parameters("norm.") == 8
    assert P.get("b") is None and P.get("a.bias") is P.data["a.bias"]
    with pytest.raises(KeyError, match="no parameter named 'b' \\(4 parameters; first few"):
        P["b"]


# ----------------------------------------------------------------------------------------------------------------
# init_params

def _torch_bounds(torch, shape):
    """PyTorch's defaults: weight kaiming_uniform_(a=sqrt(5)) bound, bias 1/sqrt(fan_in) (nn.Linear/_ConvNd)."""
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return gain * math.sqrt(3.0 / fan_in), 1.0 / math.sqrt(fan_in)


def test_init_params_rules(rng):
    torch = pytest.importorskip("torch")
    shapes = {"conv.weight": (64, 12, 3, 3), "conv.bias": (64,), "lin.weight": (300, 40), "lin.bias": (300,),
              "norm.weight": (64,), "norm.bias": (64,), "out.weight": (8, 4), "out.bias": (8,),
              "tok.weight": (500, 16), "pos": (77, 16), "orphan.bias": (5,)}
    p = init_params(shapes, rng, zero=("out.weight", "out.bias"), normal=("tok.weight",))
    assert list(p) == list(shapes) and all(p[k].shape == s and p[k].dtype == np.float32 for k, s in shapes.items())
    for layer in ("conv", "lin"):
        wb, bb = _torch_bounds(torch, shapes[f"{layer}.weight"])
        for arr, bound in ((p[f"{layer}.weight"], wb), (p[f"{layer}.bias"], bb)):
            assert np.abs(arr).max() <= bound  # inside PyTorch's interval...
            assert np.abs(arr).max() > 0.9 * bound  # ...and filling it (a wrong fan-in would fail one side)
        w = p[f"{layer}.weight"].astype(np.float64)
        assert abs(w.std() - wb / math.sqrt(3)) < 0.05 * wb / math.sqrt(3)  # uniform: std = bound / sqrt(3)
    np.testing.assert_array_equal(p["norm.weight"], np.ones(64, np.float32))  # norm scale starts at 1
    np.testing.assert_array_equal(p["norm.bias"], np.zeros(64, np.float32))
    np.testing.assert_array_equal(p["orphan.bias"], np.zeros(5, np.float32))  # no 2-D weight: zeros
    assert not p["out.weight"].any() and not p["out.bias"].any()  # zero_module outputs
    for k in ("tok.weight", "pos"):  # N(0, 0.02): explicit `normal`, and the fallback for other names
        n = p[k].size  # 5-sigma bands: standard error of the mean 0.02/sqrt(n), of the std 0.02/sqrt(2n)
        assert abs(p[k].mean()) < 5 * 0.02 / math.sqrt(n) and abs(p[k].std() - 0.02) < 5 * 0.02 / math.sqrt(2 * n)


def test_init_params_is_seeded_and_typed():
    shapes = {"l.weight": (3, 4), "l.bias": (3,)}
    a = init_params(shapes, np.random.default_rng(7), dtype=np.float64)
    b = init_params(shapes, np.random.default_rng(7), dtype=np.float64)
    c = init_params(shapes, np.random.default_rng(8), dtype=np.float64)
    assert a["l.weight"].dtype == np.float64
    np.testing.assert_array_equal(a["l.weight"], b["l.weight"])
    assert not np.array_equal(a["l.weight"], c["l.weight"])
