"""linear and embedding: float64 finite differences, PyTorch parity on odd shapes, bad input."""
import numpy as np
import pytest

from minisd.ops.linear import embedding_backward, embedding_forward, linear_backward, linear_forward
from minisd.testing import numerical_gradient, rel_error


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck_float64(rng, bias):
    x = rng.standard_normal((3, 5, 7))
    w = rng.standard_normal((4, 7))
    b = rng.standard_normal(4) if bias else None
    dy = rng.standard_normal((3, 5, 4))
    y, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(dy, cache)
    assert y.dtype == np.float64
    assert rel_error(dx, numerical_gradient(lambda: linear_forward(x, w, b)[0], x, dy)) < 1e-6
    assert rel_error(dw, numerical_gradient(lambda: linear_forward(x, w, b)[0], w, dy)) < 1e-6
    if bias:
        assert rel_error(db, numerical_gradient(lambda: linear_forward(x, w, b)[0], b, dy)) < 1e-6
    else:
        assert db is None


@pytest.mark.parametrize("shape", [(1, 13), (3, 5, 13), (2, 3, 7, 13)])
def test_linear_matches_torch(rng, shape):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((11, 13)).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    dy = rng.standard_normal(shape[:-1] + (11,)).astype(np.float32)
    y, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(dy, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(dy))
    assert y.dtype == np.float32
    assert rel_error(y, ty.detach().numpy()) < 1e-5
    assert rel_error(dx, tx.grad.numpy()) < 1e-5
    assert rel_error(dw, tw.grad.numpy()) < 1e-5
    assert rel_error(db, tb.grad.numpy()) < 1e-5


def test_linear_bad_input():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"linear: argument 'x' must have shape \(\*, 6\), got \(2, 5\)"):
        linear_forward(x, np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="linear: argument 'b'"):
        linear_forward(x, np.zeros((3, 5), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        linear_forward(x, np.zeros((3, 5), np.float64))


def test_embedding_gradcheck_and_repeats(rng):
    table = rng.standard_normal((6, 4))
    ids = np.array([[1, 3, 1], [5, 0, 1]])  # id 1 is used three times: its gradient must sum all three
    dy = rng.standard_normal((2, 3, 4))
    y, cache = embedding_forward(ids, table)
    np.testing.assert_array_equal(y, table[ids])
    dtable = embedding_backward(dy, cache)
    assert rel_error(dtable, numerical_gradient(lambda: embedding_forward(ids, table)[0], table, dy)) < 1e-6
    torch = pytest.importorskip("torch")
    tt = torch.tensor(table, requires_grad=True)
    torch.nn.functional.embedding(torch.tensor(ids), tt).backward(torch.tensor(dy))
    assert rel_error(dtable, tt.grad.numpy()) < 1e-12


def test_embedding_bad_input():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
        embedding_forward(np.array([6]), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="integer"):
        embedding_forward(np.array([1.0]), np.zeros((6, 2)))
