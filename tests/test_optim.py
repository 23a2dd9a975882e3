"""Optimizers, clipping, EMA and the LR schedule: torch parity, exact resume, independent formulas, bad input.

The torch references run torch.optim's single-tensor path (foreach=False), which is what torch uses on CPU anyway
and the code minisd follows operation by operation. One parameter ("skip") gets no gradient on some steps, so
the per-parameter step counts and the "no grad -> no update, no decay" rule are checked too.
"""
import io
import math

import numpy as np
import pytest

from minisd.nn import Params
from minisd.optim import EMA, SGD, AdamW, clip_grad_norm, lr_warmup_cosine
from minisd.testing import rel_error

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "proj.weight": (5, 7), "skip": (3, 5), "scale": (1,)}
NO_GRAD_STEPS = {1, 4, 5}  # steps at which "skip" gets no gradient


def _init(rng, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _grads(rng, dtype, steps):
    """One {name: grad} per step; "skip" is absent on NO_GRAD_STEPS."""
    seq = []
    for k in range(steps):
        seq.append({n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()
                    if not (n == "skip" and k in NO_GRAD_STEPS)})
    return seq


def _run_minisd(make_opt, params, grads_seq, lrs=None):
    opt = make_opt(params)
    for k, grads in enumerate(grads_seq):
        params.zero_grad()
        for n, g in grads.items():
            params.add_grad(n, g.copy())
        opt.step(lr=None if lrs is None else lrs[k])
    return opt


def _run_torch(torch, make_opt, init, grads_seq, lrs=None):
    tparams = {n: torch.tensor(a, requires_grad=True) for n, a in init.items()}
    opt = make_opt(list(tparams.values()))
    for k, grads in enumerate(grads_seq):
        for n, tp in tparams.items():
            tp.grad = torch.tensor(grads[n]) if n in grads else None  # None: torch skips the parameter
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[k]
        opt.step()
    return {n: tp.detach().numpy() for n, tp in tparams.items()}


# ----------------------------------------------------------------------------------------------------------------
# AdamW

@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_adamw_matches_torch(rng, dtype, tol):
    torch = pytest.importorskip("torch")
    init, grads = _init(rng, dtype), _grads(rng, dtype, 10)
    lrs = [lr_warmup_cosine(k, 3e-2, 3, 10, 1e-3) for k in range(10)]  # lr changes every step (warmup, decay)
    kw = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    P = Params({k: v.copy() for k, v in init.items()}, compute_dtype=dtype)
    _run_minisd(lambda p: AdamW(p, lr=1.0, **kw), P, grads, lrs)
    ref = _run_torch(torch, lambda tp: torch.optim.AdamW(tp, lr=1.0, foreach=False, **kw), init, grads, lrs)
    for n in SHAPES:
        assert P.data[n].dtype == dtype
        assert rel_error(P.data[n], ref[n]) < tol, n
        assert not np.array_equal(P.data[n], init[n])  # every parameter moved (the test can fail)


def test_adamw_defaults_lr_attribute_and_param_list_match_torch(rng):
    """torch defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 1e-2), lr set via opt.lr, two Params objects."""
    torch = pytest.importorskip("torch")
    init, grads = _init(rng, np.float32), _grads(rng, np.float32, 10)
    names = list(SHAPES)
    P1 = Params({n: init[n].copy() for n in names[:2]})
    P2 = Params({n: init[n].copy() for n in names[2:]})
    opt = AdamW([P1, P2])
    for k, g in enumerate(grads):
        opt.zero_grad()
        assert not P1.grads and not P2.grads
        for n, a in g.items():
            (P1 if n in P1 else P2).add_grad(n, a.copy())
        opt.lr = 1e-3 * (1 + k)  # a hand-made schedule through the attribute
        opt.step()
    ref = _run_torch(torch, lambda tp: torch.optim.AdamW(tp, foreach=False), init, grads,
                     [1e-3 * (1 + k) for k in range(10)])
    assert opt.t == 10 and opt.state["skip"]["step"] == 10 - len(NO_GRAD_STEPS)
    for n in names:
        assert rel_error((P1 if n in P1 else P2).data[n], ref[n]) < 1e-6, n


def test_no_grad_parameter_is_untouched(rng):
    """A parameter without gradient gets neither weight decay nor a moment update (torch: grad None)."""
    P = Params({"a": rng.standard_normal(3).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)})
    b0 = P.data["b"].copy()
    for opt in (AdamW(P, lr=0.1, weight_decay=0.5), SGD(P, lr=0.1, momentum=0.9, weight_decay=0.5)):
        P.zero_grad()
        P.add_grad("a", np.ones(3, np.float32))
        opt.step()
        np.testing.assert_array_equal(P.data["b"], b0)
        assert "b" not in opt.state


def test_state_does_not_alias_gradients(rng):
    """Buffers must be the optimizer's own arrays: the trainer may clip or accumulate into grads afterwards."""
    for make in (lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: AdamW(p, lr=0.1)):
        P = Params({"a": rng.standard_normal(3).astype(np.float32)})
        opt = make(P)
        P.add_grad("a", np.ones(3, np.float32))
        opt.step()
        before = {b: np.array(v, copy=True) for b, v in opt.state["a"].items()}
        P.grads["a"] *= 7.0  # e.g. clip_grad_norm or add_grad after the step, in place
        for b, v in opt.state["a"].items():
            np.testing.assert_array_equal(v, before[b])


# ----------------------------------------------------------------------------------------------------------------
# SGD

@pytest.mark.parametrize("momentum,nesterov,weight_decay,dampening", [
    (0.0, False, 0.0, 0.0), (0.0, False, 1e-2, 0.0), (0.9, False, 0.0, 0.0), (0.9, False, 1e-2, 0.0),
    (0.9, True, 0.0, 0.0), (0.9, True, 1e-2, 0.0), (0.5, False, 1e-2, 0.3)])
def test_sgd_matches_torch(rng, momentum, nesterov, weight_decay, dampening):
    torch = pytest.importorskip("torch")
    init, grads = _init(rng, np.float32), _grads(rng, np.float32, 10)
    kw = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, dampening=dampening)
    lrs = [0.05 / (1 + k) for k in range(10)]
    P = Params({k: v.copy() for k, v in init.items()})
    _run_minisd(lambda p: SGD(p, lr=0.05, **kw), P, grads, lrs)
    ref = _run_torch(torch, lambda tp: torch.optim.SGD(tp, lr=0.05, foreach=False, **kw), init, grads, lrs)
    for n in SHAPES:
        assert rel_error(P.data[n], ref[n]) < 1e-6, n


def test_sgd_float64_matches_torch(rng):
    torch = pytest.importorskip("torch")
    init, grads = _init(rng, np.float64), _grads(rng, np.float64, 10)
    P = Params({k: v.copy() for k, v in init.items()}, compute_dtype=np.float64)
    _run_minisd(lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), P, grads)
    ref = _run_torch(torch, lambda tp: torch.optim.SGD(tp, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                       foreach=False), init, grads)
    for n in SHAPES:
        assert P.data[n].dtype == np.float64
        assert rel_error(P.data[n], ref[n]) < 1e-12, n


# ----------------------------------------------------------------------------------------------------------------
# state dicts: 5 steps, save, fresh optimizer, load, 5 more == 10 straight steps, bit for bit

def _save_load(state):
    """Through an .npz file in memory, as a trainer would (also proves the state is plain arrays)."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)], ids=["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_resume_is_exact(rng, make_opt, dtype):
    init, grads = _init(rng, dtype), _grads(rng, dtype, 10)
    lrs = [lr_warmup_cosine(k, 1e-2, 2, 10) for k in range(10)]
    straight = Params({k: v.copy() for k, v in init.items()}, compute_dtype=dtype)
    _run_minisd(make_opt, straight, grads, lrs)

    first = Params({k: v.copy() for k, v in init.items()}, compute_dtype=dtype)
    opt1 = _run_minisd(make_opt, first, grads[:5], lrs[:5])
    saved_weights, saved_opt = _save_load(first.state_dict()), _save_load(opt1.state_dict())
    resumed = Params({k: np.ones_like(v) for k, v in init.items()}, compute_dtype=dtype)
    resumed.load_state_dict(saved_weights)
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved_opt)
    assert opt2.t == 5
    for k, g in enumerate(grads[5:]):
        resumed.zero_grad()
        for n, a in g.items():
            resumed.add_grad(n, a.copy())
        opt2.step(lr=lrs[5 + k])
    for n in SHAPES:
        np.testing.assert_array_equal(resumed.data[n], straight.data[n])


def test_optimizer_load_state_dict_errors(rng):
    P = Params(_init(rng, np.float32))
    opt = _run_minisd(lambda p: AdamW(p), P, _grads(rng, np.float32, 2))
    state = dict(opt.state_dict())
    other = Params({"other.weight": np.zeros((5, 7), np.float32), "conv.bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"AdamW.load_state_dict: 4 names that are not parameters of this "
                                         r"optimizer \(conv.weight, proj.weight, scale, skip\)"):
        AdamW(other).load_state_dict(state)
    bad = dict(state, **{"exp_avg.proj.weight": np.zeros((7, 5), np.float32)})
    with pytest.raises(ValueError, match=r"1 buffers with the wrong shape \(exp_avg.proj.weight: expected "
                                         r"\(5, 7\), got \(7, 5\)\)"):
        AdamW(P).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"1 unknown keys .*\(momentum_buffer.skip\)"):
        AdamW(P).load_state_dict(dict(state, **{"momentum_buffer.skip": state["exp_avg.skip"]}))
    incomplete = {k: v for k, v in state.items() if k != "exp_avg_sq.scale"}
    with pytest.raises(ValueError, match=r"1 parameters with incomplete state \(scale"):
        AdamW(P).load_state_dict(incomplete)
    with pytest.raises(ValueError, match=r"hyperparameters differ \(beta2: saved 0.999, this optimizer 0.9\)"):
        AdamW(P, betas=(0.9, 0.9)).load_state_dict(state)
    with pytest.raises(ValueError, match="no 'step' entry"):
        AdamW(P).load_state_dict({})
    fresh = AdamW(P, lr=5.0)
    fresh.load_state_dict(state)  # lr is restored from the state, as torch does
    assert fresh.lr == 1e-3 and fresh.state["skip"]["exp_avg"] is not state["exp_avg.skip"]  # copied in


def test_bad_params_and_grads(rng):
    half = Params({"w": np.zeros(3, np.float16)})
    with pytest.raises(ValueError, match=r"'w' is stored as float16.*Train in float32.*astype\(np.float32\)"):
        AdamW(half)
    P = Params({"w": np.zeros(3, np.float32)})
    opt = SGD(P, lr=0.1)
    P.astype(np.float16)  # storage changed after the optimizer was built: caught at the next step
    P.grads["w"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="float16"):
        opt.step()
    P = Params({"w": np.zeros(3, np.float32)}, compute_dtype=np.float64)  # storage float32, grads float64
    P.add_grad("w", np.ones(3))
    with pytest.raises(ValueError, match=r"gradient for 'w' is float64\(3,\) but the parameter is float32\(3,\)"):
        AdamW(P).step()
    with pytest.raises(ValueError, match="name 'w' appears in two"):
        AdamW([P, Params({"w": np.zeros(3, np.float32)})])
    with pytest.raises(ValueError, match="expected a Params"):
        AdamW({"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="nesterov"):
        SGD(P, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW(P, betas=(1.0, 0.999))


def test_read_only_weights_are_copied_before_update():
    """Memory-mapped checkpoint arrays are read-only; the first step swaps in a writable copy."""
    w = np.ones(3, np.float32)
    w.flags.writeable = False
    P = Params({"w": w})
    P.add_grad("w", np.ones(3, np.float32))
    SGD(P, lr=0.5).step()
    np.testing.assert_array_equal(P.data["w"], np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(w, np.ones(3, np.float32))  # the original is untouched


# ----------------------------------------------------------------------------------------------------------------
# clip_grad_norm

@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(rng, max_norm):
    torch = pytest.importorskip("torch")
    P1 = Params({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32), "c": np.zeros(2, np.float32)})
    P2 = Params({"d": np.zeros((2, 3, 3), np.float32)})
    for P in (P1, P2):
        for n in P:
            if n != "c":  # "c" has no gradient and must not count
                P.add_grad(n, rng.standard_normal(P.data[n].shape).astype(np.float32))
    before = {n: g.copy() for P in (P1, P2) for n, g in P.grads.items()}
    tparams = [torch.zeros(g.shape, requires_grad=True) for g in before.values()]
    for tp, g in zip(tparams, before.values()):
        tp.grad = torch.tensor(g)
    ref_norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm, foreach=False)
    norm = clip_grad_norm([P1, P2], max_norm)
    assert isinstance(norm, float)
    assert rel_error(norm, ref_norm.item()) < 1e-6
    assert rel_error(norm, math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in before.values()))) < 1e-7
    after = {n: g for P in (P1, P2) for n, g in P.grads.items()}
    for (n, g), tp in zip(after.items(), tparams):
        assert rel_error(g, tp.grad.numpy()) < 1e-6, n
        if max_norm > norm:
            np.testing.assert_array_equal(g, before[n])  # below the limit: untouched, not multiplied by ~1
    if max_norm < norm:
        clipped = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in after.values()))
        assert abs(clipped - max_norm) < 1e-5


def test_clip_grad_norm_big_tensor_accuracy(rng):
    """4 * 65536 + 1 elements: several float32 dot-product chunks and a last chunk of one element."""
    g = (3 * rng.standard_normal(4 * 65536 + 1) + 1).astype(np.float32)
    P = Params({"w": np.zeros(g.shape, np.float32)})
    P.add_grad("w", g.copy())
    ref = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert rel_error(clip_grad_norm(P, 1.0), ref) < 1e-7
    assert rel_error(P.grads["w"], g * (1.0 / (ref + 1e-6))) < 1e-6


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_non_finite_leaves_grads(rng, bad):
    P = Params({"a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)})
    P.add_grad("a", rng.standard_normal(4).astype(np.float32))
    g = np.ones(3, np.float32)
    g[1] = bad
    P.add_grad("b", g)
    before = {n: v.copy() for n, v in P.grads.items()}
    norm = clip_grad_norm(P, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) == math.isnan(bad))
    for n in before:
        np.testing.assert_array_equal(P.grads[n], before[n])
    assert clip_grad_norm(Params({"a": np.zeros(2, np.float32)}), 1.0) == 0.0  # no gradients at all


# ----------------------------------------------------------------------------------------------------------------
# EMA

def _ema_reference(snapshots, decay, warmup):
    """Independent float64 formula: s_0 = p_0; s_t = d_t * s_{t-1} + (1 - d_t) * p_t, d_t = min(decay, (1+t)/(10+t))."""
    s = {n: a.astype(np.float64) for n, a in snapshots[0].items()}
    decays = []
    for t, p in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        decays.append(d)
        s = {n: d * s[n] + (1 - d) * p[n].astype(np.float64) for n in s}
    return s, decays


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("warmup,decay", [(True, 0.9), (True, 0.9999), (False, 0.7)])
def test_ema_matches_formula(rng, dtype, tol, warmup, decay):
    P = Params(_init(rng, dtype), compute_dtype=dtype)
    ema = EMA(P, decay=decay, warmup=warmup)
    snapshots = [{n: a.copy() for n, a in P.data.items()}]
    decays = []
    for _ in range(100):  # with warmup, (1+t)/(10+t) reaches 0.9 at t = 80: decay=0.9 is capped from there on
        for n in P:
            P.data[n] += rng.standard_normal(P.data[n].shape).astype(dtype)
        snapshots.append({n: a.copy() for n, a in P.data.items()})
        decays.append(ema.update())
    ref, ref_decays = _ema_reference(snapshots, decay, warmup)
    np.testing.assert_allclose(decays, ref_decays, rtol=1e-15)
    assert ema.num_updates == 100
    for n in SHAPES:
        assert ema.shadow[n].dtype == dtype
        assert rel_error(ema.shadow[n], ref[n]) < tol, n


def test_ema_warmup_caps_at_decay():
    P = Params({"w": np.zeros(2, np.float32)})
    ema = EMA(P, decay=0.5)
    assert ema.update() == 2 / 11  # (1+1)/(10+1), LitEma's first decay
    for _ in range(10):
        ema.update()
    assert ema.current_decay(ema.num_updates) == 0.5  # (1+11)/(10+11) = 0.57 > 0.5: capped


def test_ema_copy_to_and_swap(rng):
    P = Params(_init(rng, np.float32))
    ema = EMA(P, decay=0.5, warmup=False)
    for n in P:
        P.data[n] += 1.0
    ema.update()
    live = {n: a.copy() for n, a in P.data.items()}
    shadow = {n: s.copy() for n, s in ema.shadow.items()}
    held = {n: P.data[n] for n in P}  # callers holding the arrays see the swap: it is in place
    ema.swap()
    for n in SHAPES:
        np.testing.assert_array_equal(P.data[n], shadow[n])
        np.testing.assert_array_equal(ema.shadow[n], live[n])
        assert P.data[n] is held[n]
    ema.swap()
    for n in SHAPES:
        np.testing.assert_array_equal(P.data[n], live[n])
        np.testing.assert_array_equal(ema.shadow[n], shadow[n])
    infer = Params({n: np.zeros(s, np.float16) for n, s in SHAPES.items()})  # fp16 inference copy
    ema.copy_to(infer)
    for n in SHAPES:
        assert infer.data[n].dtype == np.float16
        np.testing.assert_array_equal(infer.data[n], shadow[n].astype(np.float16))
    with pytest.raises(ValueError, match="stored as float16 but the shadow is float32"):
        ema.swap(infer)
    with pytest.raises(ValueError, match=r"EMA.copy_to: .*4 missing .*1 unexpected \(x\)"):
        ema.copy_to(Params({"x": np.zeros(1, np.float32), "skip": np.zeros((3, 5), np.float32)}))
    with pytest.raises(ValueError, match=r"with the wrong shape \(scale: expected \(1,\), got \(2,\)\)"):
        ema.copy_to(Params({n: np.zeros(s if n != "scale" else (2,), np.float32) for n, s in SHAPES.items()}))
    with pytest.raises(ValueError, match="decay"):
        EMA(P, decay=1.5)


def test_ema_state_dict_resume_is_exact(rng):
    P = Params(_init(rng, np.float32))
    steps = [{n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(6)]
    straight = EMA(P, decay=0.99)
    for st in steps:
        for n in P:
            P.data[n] += st[n]
        straight.update()
    P2 = Params(_init(np.random.default_rng(0), np.float32))  # same rng seed as the fixture: same start
    ema = EMA(P2, decay=0.99)
    for st in steps[:3]:
        for n in P2:
            P2.data[n] += st[n]
        ema.update()
    saved = _save_load(ema.state_dict())
    resumed = EMA(P2, decay=0.5)  # decay is restored from the state
    resumed.load_state_dict(saved)
    for st in steps[3:]:
        for n in P2:
            P2.data[n] += st[n]
        resumed.update()
    assert resumed.num_updates == 6 and resumed.decay == 0.99
    for n in SHAPES:
        np.testing.assert_array_equal(resumed.shadow[n], straight.shadow[n])
    bad = {k: v for k, v in saved.items() if k != "shadow.skip"}
    with pytest.raises(ValueError, match=r"EMA.load_state_dict: 1 missing \(skip\)"):
        EMA(P2).load_state_dict(bad)


# ----------------------------------------------------------------------------------------------------------------
# learning-rate schedule

@pytest.mark.parametrize("warmup,total,min_lr", [(10, 100, 0.0), (10, 100, 1e-5), (0, 37, 2e-5), (5, 5, 0.0)])
def test_lr_warmup_cosine_matches_transformers_lambdalr(warmup, total, min_lr):
    """Against torch's LambdaLR driven by transformers' cosine-with-warmup lambda (an independent implementation)."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    base = 3e-4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    if min_lr == 0.0:
        sched = optimization.get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = optimization.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr=min_lr)
    for step in range(total + 1):
        ref = opt.param_groups[0]["lr"]  # the lr optimizer step `step` uses
        assert abs(lr_warmup_cosine(step, base, warmup, total, min_lr) - ref) <= 1e-12 * base, step
        opt.step()
        sched.step()
    for step in (total + 1, 2 * total + 7):  # past the end: stays at min_lr (transformers' cosine would rise)
        assert lr_warmup_cosine(step, base, warmup, total, min_lr) == min_lr


def test_lr_warmup_cosine_shape_and_errors():
    assert lr_warmup_cosine(0, 1.0, 4, 10) == 0.0
    assert lr_warmup_cosine(2, 1.0, 4, 10) == 0.5
    assert lr_warmup_cosine(4, 1.0, 4, 10) == 1.0
    assert abs(lr_warmup_cosine(7, 1.0, 4, 10) - 0.5) < 1e-15  # half way through the cosine
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        lr_warmup_cosine(0, 1.0, 10, 5)
    with pytest.raises(ValueError, match="step >= 0"):
        lr_warmup_cosine(-1, 1.0, 0, 5)
