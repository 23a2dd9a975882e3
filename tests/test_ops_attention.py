"""attention: float64 finite differences, PyTorch SDPA parity, chunking invariance, the memory bound, bad input."""
import tracemalloc

import numpy as np
import pytest

import minisd.ops.attention as attention
import minisd.ops.common as common
from minisd.ops.attention import attention_backward, attention_forward
from minisd.testing import numerical_gradient, rel_error


def _qkv(rng, N, L, S, D, dtype=np.float64):
    q = rng.standard_normal((N, L, D)).astype(dtype)
    k = rng.standard_normal((N, S, D)).astype(dtype)
    v = rng.standard_normal((N, S, D)).astype(dtype)
    dy = rng.standard_normal((N, L, D)).astype(dtype)
    return q, k, v, dy


def _torch_sdpa(q, k, v, dy, h, causal, scale=None):
    """Reference: F.scaled_dot_product_attention on heads split the diffusers way, `b n (h d) -> b h n d`."""
    torch = pytest.importorskip("torch")
    N, L, D = q.shape
    split = [torch.tensor(a.reshape(N, a.shape[1], h, D // h).transpose(0, 2, 1, 3).copy(), requires_grad=True)
             for a in (q, k, v)]  # (N, h, T, d)
    y = torch.nn.functional.scaled_dot_product_attention(*split, is_causal=causal, scale=scale)
    tdy = torch.tensor(dy.reshape(N, L, h, D // h).transpose(0, 2, 1, 3).copy())  # (N, h, L, d)
    grads = torch.autograd.grad(y, split, tdy)
    merge = lambda t: t.detach().numpy().transpose(0, 2, 1, 3).reshape(N, t.shape[2], D)  # (N, T, D)
    return (merge(y),) + tuple(merge(g) for g in grads)


# (N, L, S, h, d, causal, scale, max_score_bytes): self, cross, causal, h=1 and h=3, N=1 and 3, odd L and S,
# a non-default scale, and tiny bounds that force one query row per block.
GRAD_CASES = [
    (1, 5, 5, 1, 3, False, None, None),
    (3, 5, 7, 3, 2, False, None, None),
    (1, 7, 3, 3, 3, False, 0.7, None),
    (3, 7, 7, 3, 2, True, None, None),
    (1, 5, 5, 1, 3, True, None, None),
    (3, 7, 9, 3, 2, False, None, 1),
    (3, 7, 7, 1, 3, True, None, 1),
]


@pytest.mark.parametrize("N, L, S, h, d, causal, scale, max_score_bytes", GRAD_CASES)
def test_attention_gradcheck_float64(rng, N, L, S, h, d, causal, scale, max_score_bytes):
    q, k, v, dy = _qkv(rng, N, L, S, h * d)
    originals = [a.copy() for a in (q, k, v, dy)]
    f = lambda: attention_forward(q, k, v, h, causal=causal, scale=scale, max_score_bytes=max_score_bytes)[0]
    y, cache = attention_forward(q, k, v, h, causal=causal, scale=scale, max_score_bytes=max_score_bytes)
    dq, dk, dv = attention_backward(dy, cache)
    for a, before in zip((q, k, v, dy), originals):
        np.testing.assert_array_equal(a, before)  # the op must not scale or overwrite its inputs in place
    assert y.dtype == dq.dtype == dk.dtype == dv.dtype == np.float64
    assert y.shape == dq.shape == (N, L, h * d) and dk.shape == dv.shape == (N, S, h * d)
    assert rel_error(dq, numerical_gradient(f, q, dy)) < 1e-6
    assert rel_error(dk, numerical_gradient(f, k, dy)) < 1e-6
    assert rel_error(dv, numerical_gradient(f, v, dy)) < 1e-6


def test_attention_forward_matches_definition_float64(rng):
    # An independent dense computation of softmax(q k^T / sqrt(d)) v with the causal mask, head by head.
    N, L, h, d = 2, 6, 3, 4
    q, k, v, _ = _qkv(rng, N, L, L, h * d)
    y, _ = attention_forward(q, k, v, h, causal=True)
    for n in range(N):
        for j in range(h):
            cols = slice(j * d, (j + 1) * d)  # head j owns columns [j*d, (j+1)*d) of D
            s = q[n, :, cols] @ k[n, :, cols].T / np.sqrt(d)
            s[np.triu_indices(L, 1)] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            assert rel_error(y[n, :, cols], p @ v[n, :, cols]) < 1e-14


# (N, L, S, h, d, causal, scale, max_score_bytes)
TORCH_CASES = [
    (1, 7, 7, 1, 5, False, None, None),
    (3, 13, 5, 3, 7, False, None, None),
    (3, 11, 11, 3, 5, True, None, None),
    (1, 9, 9, 2, 3, True, None, 64),
    (3, 5, 19, 1, 9, False, 0.3, 100),
    (2, 77, 77, 4, 6, True, None, None),  # CLIP-like causal
]


@pytest.mark.parametrize("N, L, S, h, d, causal, scale, max_score_bytes", TORCH_CASES)
def test_attention_matches_torch(rng, N, L, S, h, d, causal, scale, max_score_bytes):
    q, k, v, dy = _qkv(rng, N, L, S, h * d, np.float32)
    y, cache = attention_forward(q, k, v, h, causal=causal, scale=scale, max_score_bytes=max_score_bytes)
    grads = attention_backward(dy, cache)
    ref = _torch_sdpa(q, k, v, dy, h, causal, scale)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    for ours, theirs in zip((y,) + grads, ref):
        assert rel_error(ours, theirs) < 1e-5


def test_attention_threaded_blocks_match_torch(rng, monkeypatch):
    # Big enough for many blocks, multi-head blocks and a threaded elementwise split (forced on any machine).
    monkeypatch.setattr(attention, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(common, "num_threads", lambda: 2)
    for N, L, S, h, d, bound in [(2, 301, 257, 3, 8, 40_000), (1, 333, 17, 5, 4, 50_000)]:
        q, k, v, dy = _qkv(rng, N, L, S, h * d, np.float32)
        y, cache = attention_forward(q, k, v, h, max_score_bytes=bound)
        grads = attention_backward(dy, cache)
        for ours, theirs in zip((y,) + grads, _torch_sdpa(q, k, v, dy, h, False)):
            assert rel_error(ours, theirs) < 1e-5


def test_attention_large_logits_do_not_overflow(rng):
    # Scores of several thousand: exp overflows float32 (max ~88) unless the row max is subtracted first.
    N, L, h, d = 1, 9, 2, 8
    q, k, v, dy = _qkv(rng, N, L, L, h * d, np.float32)
    q *= 60
    k *= 60
    y, cache = attention_forward(q, k, v, h, causal=True)
    grads = attention_backward(dy, cache)
    assert all(np.isfinite(a).all() for a in (y,) + grads)
    ref = _torch_sdpa(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                      dy.astype(np.float64), h, True)
    assert rel_error(y, ref[0]) < 1e-5
    assert rel_error(grads[2], ref[3]) < 1e-5  # dv = p^T dy; dq, dk scale with the huge logits, checked elsewhere


@pytest.mark.parametrize("causal", [False, True])
def test_attention_chunked_equals_unchunked(rng, causal):
    # One query row per block (bound of 1 byte) against a single block holding everything.
    N, L, h, d = 3, 21, 3, 4
    S = L if causal else 10
    for dtype, tol in [(np.float64, 1e-13), (np.float32, 1e-6)]:
        q, k, v, dy = _qkv(rng, N, L, S, h * d, dtype)
        results = []
        for bound in (1, 1 << 40):
            y, cache = attention_forward(q, k, v, h, causal=causal, max_score_bytes=bound)
            results.append((y,) + attention_backward(dy, cache))
        for tiny, huge in zip(*results):
            assert rel_error(tiny, huge) < tol


def test_attention_thread_count_does_not_change_results(rng, monkeypatch):
    # Threads split only the elementwise work by query rows; dk/dv sums keep a fixed order: results are
    # bit-identical whatever the thread count.
    monkeypatch.setattr(attention, "MIN_ELEMENTS_PER_THREAD", 1)
    q, k, v, dy = _qkv(rng, 2, 37, 29, 12, np.float32)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(common, "num_threads", lambda t=threads: t)
        y, cache = attention_forward(q, k, v, 3, max_score_bytes=3000)
        results.append((y,) + attention_backward(dy, cache))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def _peak_bytes(fn):
    """Peak bytes newly allocated (NumPy reports its buffers to tracemalloc) while fn runs, and fn's result."""
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("h, bound", [(8, None), (1, 2 * 2**20)])
def test_attention_memory_bound(rng, h, bound):
    # SD 1.5 at a 64x64 latent: 4096 tokens, 8 heads x 40; the full float32 score tensor is 512 MiB. Then an
    # explicit bound below the default block size (TARGET_BLOCK_BYTES), on 1 head to keep the test fast.
    N, L, d = 1, 4096, 40
    q, k, v, dy = _qkv(rng, N, L, L, h * d, np.float32)
    full_scores = N * h * L * L * 4
    limit = attention.DEFAULT_MAX_SCORE_BYTES if bound is None else bound
    assert bound is None or bound < attention.TARGET_BLOCK_BYTES  # else this case would not test the bound
    unit = q.nbytes  # one q/k/v/out/grad-sized array (5 MiB for 8 heads)
    slack = 2**19  # per-row stats (lse, max, sum: 128 KiB each at most) and small temporaries
    peak_f, (y, cache) = _peak_bytes(lambda: attention_forward(q, k, v, h, max_score_bytes=bound))
    # forward allocates split q, k, v (3 units), the split and the packed output (2), then the score buffer
    assert peak_f - 5 * unit <= limit + slack
    peak_b, grads = _peak_bytes(lambda: attention_backward(dy, cache))
    # backward: split dy (1), split and packed dq, dk, dv (6), one block's dk/dv share (<= 1), p and dp buffers
    assert peak_b - 8 * unit <= limit + slack
    assert max(peak_f, peak_b) < full_scores / 4
    # the result is still right: head 0, first 256 queries, against a dense float64 computation
    qh, kh, vh = (a[0, :, :d].astype(np.float64) for a in (q, k, v))
    s = qh[:256] @ kh.T / np.sqrt(d)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    assert rel_error(y[0, :256, :d], (p / p.sum(axis=1, keepdims=True)) @ vh) < 1e-5
    assert all(np.isfinite(g).all() for g in grads)


def test_attention_bad_input():
    f32 = lambda *shape: np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"attention: argument 'k' must have shape \(2, \*, 8\), got \(2, 5, 6\)"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 6), f32(2, 5, 6), 2)
    with pytest.raises(ValueError, match=r"attention: argument 'v' must have shape \(2, 5, 8\), got \(2, 4, 8\)"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 4, 8), 2)
    with pytest.raises(ValueError, match=r"attention: argument 'k' must have shape \(2, \*, 8\), got \(1, 5, 8\)"):
        attention_forward(f32(2, 3, 8), f32(1, 5, 8), f32(1, 5, 8), 2)
    with pytest.raises(ValueError, match="'num_heads' must be a positive integer dividing D = 8.*got 3"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 8), 3)
    with pytest.raises(ValueError, match="'num_heads'"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 8), 0)
    with pytest.raises(ValueError, match="causal=True needs as many keys as queries.*L = 3.*S = 5"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 8), 2, causal=True)
    with pytest.raises(ValueError, match="dtype"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8).astype(np.float64), f32(2, 5, 8), 2)
    with pytest.raises(ValueError, match="float"):
        ints = lambda *shape: np.zeros(shape, np.int64)
        attention_forward(ints(2, 3, 8), ints(2, 5, 8), ints(2, 5, 8), 2)
    with pytest.raises(ValueError, match=r"attention: argument 'q' must be 3-D, got shape \(3, 8\)"):
        attention_forward(f32(3, 8), f32(5, 8), f32(5, 8), 2)
    with pytest.raises(ValueError, match="'max_score_bytes' must be a positive number of bytes"):
        attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 8), 2, max_score_bytes=0)
    _, cache = attention_forward(f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 8), 2)
    with pytest.raises(ValueError, match=r"attention_backward: argument 'dy' must have shape \(2, 3, 8\)"):
        attention_backward(f32(2, 5, 8), cache)
    with pytest.raises(ValueError, match="dtype"):
        attention_backward(f32(2, 3, 8).astype(np.float64), cache)
