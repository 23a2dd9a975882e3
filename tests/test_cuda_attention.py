"""Fused attention on the GPU path (kernels/attention.cu through minisd/cuda/attention.py) against PyTorch and the
NumPy op.

Every kernel version, forward (y and the saved log-sum-exp) and backward (dq, dk, dv), on small and ragged shapes:
self attention (S == L) and cross attention (S != L, S > L and S < L), causal, batch 1, 2 and 3, h = 1, 2 and 3,
head dims 40, 64, 80, 160 (SD's) and odd ones (13, 17) (wider heads, e.g. the VAE's 512: a blockwise path in array
ops, test_wide_heads_run_blockwise), token counts that are not multiples of the 64-row blocks or
the 32-row tiles (70 queries: a second, ragged block; 77 keys: three tiles, the last one ragged), L = 1; under the
three emulator thread orders and on a real GPU (`dev`, see tests/cuda_testing.py), and once more with ASan + UBSan
(test_attention_under_sanitizer). Outputs start NaN-filled, so "finite" means "written".

References: PyTorch float64 (softmax(q k^T * scale) v written out, autograd for the gradients) and minisd's NumPy
op in float32 (the spec, memory-bounded and blockwise). Tolerance (cuda_testing.check): 1e-5 x max|ref| + 1e-6 |ref|
elementwise; measured errors are <= 5e-7 relative. A wrong mask, a missing rescale of the running sums or a wrong
D term gives errors of order 0.1-1.
"""
import numpy as np
import pytest

from minisd.cuda import attention as cuda_att
from minisd.cuda import ops
from minisd.ops import attention as np_att

from cuda_testing import check, dev, emu_forward, f32, run_under_sanitizer, spec, SANITIZE  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")

# (N, L, S, h, d, causal)
CASES = [
    (1, 5, 5, 1, 40, False),  # SD 1.5's head dim at 64x64, one partial tile
    (3, 70, 77, 3, 13, False),  # cross attention, odd d, two query blocks, three key tiles (77 text tokens)
    (2, 37, 37, 2, 64, True),  # causal (CLIP), SD 2's / CLIP's head dim
    (1, 9, 3, 1, 160, False),  # the largest head dim (1280 channels / 8 heads), fewer keys than queries
    (3, 70, 70, 1, 17, True),  # causal across block and tile boundaries, odd d
    (2, 33, 77, 2, 80, False),  # SD 1.5's 640-channel level (d = 80) with a text context
    (2, 1, 5, 2, 8, False),  # a single query
]


def _case_id(c):
    N, L, S, h, d, causal = c
    return f"N{N}_L{L}_S{S}_h{h}_d{d}" + ("_causal" if causal else "")


def torch_attention(q, k, v, dy, h, causal, scale=None):
    """float64 reference written out (not SDPA, so the mask and the head split are explicit): y, dq, dk, dv, lse."""
    N, L, D = q.shape
    S, d = k.shape[1], D // h
    scale = d ** -0.5 if scale is None else scale
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v)]
    qh, kh, vh = (a.reshape(N, a.shape[1], h, d).transpose(1, 2) for a in t)  # (N, h, T, d)
    s = qh @ kh.transpose(-1, -2) * scale  # (N, h, L, S)
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)  # (N, h, L)
    y = (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(N, L, D)  # (N, L, D)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return (y.detach().numpy(),) + tuple(a.grad.numpy() for a in t) + (lse.detach().numpy().reshape(N * h, L),)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention(dev, rng, version, case):
    N, L, S, h, d, causal = case
    q, k, v = f32(rng, N, L, h * d), f32(rng, N, S, h * d), f32(rng, N, S, h * d)
    dy = f32(rng, N, L, h * d)
    y, cache = ops.attention_forward(dev.put(q), dev.put(k), dev.put(v), h, causal, version=version)
    dq, dk, dv = ops.attention_backward(dev.put(dy), cache, version=version)
    ty, tdq, tdk, tdv, tlse = torch_attention(q, k, v, dy, h, causal)
    check("y", dev.get(y), ty)
    check("lse", dev.get(cache.lse), tlse)
    check("dq", dev.get(dq), tdq)
    check("dk", dev.get(dk), tdk)
    check("dv", dev.get(dv), tdv)
    y_np, c_np = spec(np_att.attention_forward, q, k, v, h, causal)
    check("y vs NumPy op", dev.get(y), y_np)
    check("lse vs NumPy op", dev.get(cache.lse), c_np.lse)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), spec(np_att.attention_backward, dy, c_np)):
        check(f"{name} vs NumPy op", dev.get(got), want)


def test_scale_and_max_score_bytes_are_honoured(emu_forward, rng):
    """A non-default scale enters the scores (and dq); max_score_bytes is validated and stored in the cache."""
    q, k, v, dy = f32(rng, 2, 7, 6), f32(rng, 2, 9, 6), f32(rng, 2, 9, 6), f32(rng, 2, 7, 6)
    y, cache = ops.attention_forward(q, k, v, 3, scale=0.7, max_score_bytes=123)
    assert cache.scale == 0.7 and cache.max_score_bytes == 123 and cache.num_heads == 3 and not cache.causal
    ty, tdq, tdk, tdv, _ = torch_attention(q, k, v, dy, 3, False, scale=0.7)
    check("y", y, ty)
    for name, got, want in zip(("dq", "dk", "dv"), ops.attention_backward(dy, cache), (tdq, tdk, tdv)):
        check(name, got, want)
    with pytest.raises(ValueError, match=r"max_score_bytes' must be a positive number of bytes"):
        ops.attention_forward(q, k, v, 3, max_score_bytes=0)


def test_caches_interoperate_with_the_numpy_op(emu_forward, rng):
    """Same AttentionCache (heads split, q pre-scaled): a forward on one path feeds the backward of the other."""
    q, k, v, dy = f32(rng, 3, 11, 12), f32(rng, 3, 11, 12), f32(rng, 3, 11, 12), f32(rng, 3, 11, 12)
    _, c_cu = ops.attention_forward(q, k, v, 2, True)
    _, c_np = spec(np_att.attention_forward, q, k, v, 2, True)
    assert type(c_cu) is type(c_np)
    for name in ("q", "k", "v", "lse"):
        got, want = getattr(c_cu, name), getattr(c_np, name)
        assert got.shape == want.shape and got.flags.c_contiguous
        check(f"cache.{name}", got, want)
    for got, want in zip(ops.attention_backward(dy, c_np), spec(np_att.attention_backward, dy, c_cu)):
        check("crossed caches", got, want)


def test_inputs_are_not_modified(emu_forward, rng):
    """h = 1: the head split is a no-op reshape, and the cached q must still be a copy (scaled), not q itself."""
    for h in (1, 2):
        q, k, v = f32(rng, 2, 5, 8), f32(rng, 2, 6, 8), f32(rng, 2, 6, 8)
        before = [a.copy() for a in (q, k, v)]
        y1, cache = ops.attention_forward(q, k, v, h)
        y2, _ = ops.attention_forward(q, k, v, h)
        for a, b in zip((q, k, v), before):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(y1, y2)
        assert not np.shares_memory(cache.q, q)


def test_non_contiguous_inputs(emu_forward, rng):
    q = f32(rng, 7, 2, 6).transpose(1, 0, 2)  # (2, 7, 6), not C-contiguous
    k = f32(rng, 2, 6, 5)[:, :, ::-1].transpose(0, 2, 1)  # (2, 5, 6), negative strides
    v = f32(rng, 2, 5, 6)
    dy = f32(rng, 2, 7, 6)
    y, cache = ops.attention_forward(q, k, v, 3)
    ty, tdq, tdk, tdv, _ = torch_attention(np.ascontiguousarray(q), np.ascontiguousarray(k), v, dy, 3, False)
    check("y", y, ty)
    for name, got, want in zip(("dq", "dk", "dv"), ops.attention_backward(dy, cache), (tdq, tdk, tdv)):
        check(name, got, want)


def test_bad_input_is_refused_before_launch(emu_forward):
    q = np.zeros((2, 5, 6), np.float32)
    with pytest.raises(ValueError, match=r"attention: argument 'num_heads' must be a positive integer dividing"):
        ops.attention_forward(q, q, q, 4)
    with pytest.raises(ValueError, match=r"causal=True needs as many keys as queries"):
        ops.attention_forward(q, q[:, :3], q[:, :3], 2, causal=True)
    with pytest.raises(ValueError, match=r"argument 'k' must have shape \(2, \*, 6\), got \(2, 3, 4\)"):
        ops.attention_forward(q, q[:, :3, :4], q[:, :3, :4], 2)
    with pytest.raises(ValueError, match=r"attention \(cuda\): argument 'q' must be float32 .* got float64"):
        ops.attention_forward(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64), 2)
    with pytest.raises(ValueError, match=r"version 3 does not exist; available: \(1, 2\)"):
        ops.attention_forward(q, q, q, 2, version=3)
    _, cache = ops.attention_forward(q, q, q, 2)
    with pytest.raises(ValueError, match=r"attention_backward \(cuda\): argument 'dy' must have shape \(2, 5, 6\)"):
        ops.attention_backward(q[:, :4], cache)


@pytest.mark.parametrize("N, L, S, h, d, causal, max_score_bytes", [
    (2, 9, 9, 1, 512, False, None),  # the SD VAE's mid-block attention: one head of 512
    (1, 13, 13, 2, 168, True, 4 * 2 * 13 * 6),  # causal; blocks of 3 (forward) and 2 (backward) query rows
    (2, 7, 11, 1, 200, False, 1),  # cross, the bound below one row: one row per block
])
def test_wide_heads_run_blockwise(emu_forward, rng, monkeypatch, N, L, S, h, d, causal, max_score_bytes):
    """d > 160 (no register tile for it): the memory-bounded blockwise path in array ops, same cache and results."""
    q, k, v, dy = f32(rng, N, L, h * d), f32(rng, N, S, h * d), f32(rng, N, S, h * d), f32(rng, N, L, h * d)
    from minisd.cuda import launch
    monkeypatch.setattr(launch, "get_module", lambda *a: pytest.fail("a kernel was launched for d > 160"))
    y, cache = ops.attention_forward(q, k, v, h, causal, max_score_bytes=max_score_bytes)
    dq, dk, dv = ops.attention_backward(dy, cache)
    ty, tdq, tdk, tdv, tlse = torch_attention(q, k, v, dy, h, causal)
    for name, got, want in (("y", y, ty), ("lse", cache.lse, tlse), ("dq", dq, tdq), ("dk", dk, tdk), ("dv", dv, tdv)):
        check(name, got, want)
    y_np, c_np = spec(np_att.attention_forward, q, k, v, h, causal)
    check("cache.q vs NumPy op", cache.q, c_np.q)
    for got, want in zip(ops.attention_backward(dy, c_np), spec(np_att.attention_backward, dy, cache)):
        check("crossed caches", got, want)


def test_shared_memory_plan():
    """The dynamic shared memory the launcher asks for: over 48 KiB needs the opt-in, and every layout fits the
    227 KiB an H100 block may have (an A100's 163 KiB too)."""
    for d in (8, 40, 64, 80, 128, 160):
        for kind in ("forward", "dq", "dkdv"):
            assert cuda_att._smem_bytes(kind, d) <= 163 * 1024, (kind, d)
    assert cuda_att._smem_bytes("forward", 40) < 48 * 1024 < cuda_att._smem_bytes("dkdv", 160)


def test_dispatch_from_the_numpy_op(emu_forward, rng):
    """minisd.ops.attention_forward/backward hand float32 arrays to the kernels while emulating (the cached q is then
    contiguous float32 written by the launcher); float64 keeps the NumPy path."""
    q, k, v = f32(rng, 2, 5, 6), f32(rng, 2, 7, 6), f32(rng, 2, 7, 6)
    calls = []
    real = cuda_att.attention_forward

    def spy(*args, **kwargs):
        calls.append("forward")
        return real(*args, **kwargs)

    ops.attention_forward = spy  # minisd.ops.attention looks the function up at call time
    try:
        y, cache = np_att.attention_forward(q, k, v, 2)
    finally:
        ops.attention_forward = real
    assert calls == ["forward"]
    check("y", y, spec(np_att.attention_forward, q, k, v, 2)[0])
    dq, dk, dv = np_att.attention_backward(f32(rng, 2, 5, 6), cache)
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    ops.attention_forward = spy
    try:
        np_att.attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 2)
    finally:
        ops.attention_forward = real
    assert calls == ["forward"]  # float64 did not reach the kernels


@pytest.mark.skipif(SANITIZE, reason="already running under the sanitizer")
def test_attention_under_sanitizer():
    """This file again with ASan + UBSan builds of the kernels (out-of-bounds and int-overflow checks)."""
    run_under_sanitizer(__file__)
