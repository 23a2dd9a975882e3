"""Optimizers (SGD, AdamW), gradient clipping by global norm, EMA of weights, warmup + cosine learning rate.

Everything here works on `nn.Params` (or a list of them: U-Net + text encoder, say). An optimizer reads the
gradients the model's backward left in `params.grads` and updates `params.data` *in place*, in the storage dtype,
which must be float32 (the "master weights") or float64 (for exact checks). A parameter with no entry in
`params.grads` got no gradient this step and is skipped entirely (no weight decay, no moment update, its own step
count does not advance), exactly as PyTorch skips a parameter whose `.grad` is None.

Every update reproduces PyTorch's CPU implementation operation by operation (the single-tensor "for-loop" path
that torch uses on CPU: not foreach, not fused), so minisd and torch agree to about one float32 rounding:

    SGD    (torch.optim.SGD):    g <- g + wd*p;  buf <- g on the first step, else momentum*buf + (1-dampening)*g;
                                 g <- g + momentum*buf (nesterov) or buf;  p <- p - lr*g
    AdamW  (torch.optim.AdamW):  t <- t+1;  p <- p*(1 - lr*wd);  m <- lerp(m, g, 1-b1);  v <- b2*v + (1-b2)*g*g;
                                 p <- p - (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

Note that torch keeps the step count t *per parameter* (state["step"]), so a parameter that missed some steps
uses its own, smaller t in the bias corrections; minisd does the same.

State dicts are flat {str: array} mappings (scalars are 0-d arrays) so they can be written next to the weights
with the safetensors writer or np.savez: "step", the hyperparameters, and one entry per buffer and parameter,
"<buffer>.<parameter name>", e.g. "exp_avg.model.diffusion_model.out.2.weight". The buffers are the live arrays,
not copies (like Params.state_dict): write them out before stepping again, or copy them.

Shapes: every buffer has its parameter's shape; nothing here depends on the layout.

References (pinned; the torch commit is the one the tested wheel, torch 2.13.0, was built from):
  torch SGD   https://github.com/pytorch/pytorch/blob/cf30153c4c131c8164ee7798e5022d810682e2cb/torch/optim/sgd.py
              (_single_tensor_sgd)
  torch Adam  https://github.com/pytorch/pytorch/blob/cf30153c4c131c8164ee7798e5022d810682e2cb/torch/optim/adam.py
              (_single_tensor_adam; torch.optim.AdamW is Adam with decoupled_weight_decay=True)
  clipping    https://github.com/pytorch/pytorch/blob/cf30153c4c131c8164ee7798e5022d810682e2cb/torch/nn/utils/clip_grad.py
  AdamW paper Loshchilov & Hutter, "Decoupled Weight Decay Regularization", https://arxiv.org/abs/1711.05101
  EMA         LitEma, https://github.com/CompVis/stable-diffusion/blob/555f13e46975933085cb22d761068a0781ca6f42/ldm/modules/ema.py
  schedule    transformers 5.24.0 _get_cosine_schedule_with_warmup_lr_lambda,
              https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/optimization.py
"""
import math

import numpy as np

from .backend import is_cuda, xp_of
from .nn import Params, _listing

TRAINABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by the optimizers and EMA

def _as_list(params, who):
    """A Params or a list/tuple of Params -> list of Params (ValueError otherwise)."""
    plist = [params] if isinstance(params, Params) else list(params) if isinstance(params, (list, tuple)) else None
    if not plist or not all(isinstance(p, Params) for p in plist):
        raise ValueError(f"{who}: expected a Params or a non-empty list of Params, got {type(params).__name__}")
    return plist


def _named(plist, who):
    """[(Params, name)] over every parameter; names must be unique because state is keyed by name."""
    seen, out = set(), []
    for P in plist:
        for name in P.keys():
            if name in seen:
                raise ValueError(f"{who}: parameter name {name!r} appears in two of the given Params; state is "
                                 f"keyed by name, so names must be unique (use full checkpoint keys)")
            seen.add(name)
            out.append((P, name))
    return out


def _check_trainable(who, name, a):
    if a.dtype not in TRAINABLE_DTYPES:
        raise ValueError(f"{who}: parameter {name!r} is stored as {a.dtype}; optimizers update the stored weights in "
                         f"place and need float32 master weights (float64 for checks). Train in float32: call "
                         f"params.astype(np.float32) before building the optimizer (float16 is for inference)")


def _writable(P, name):
    """P.data[name], replaced once by a writable copy if it is read-only (e.g. memory-mapped from a checkpoint
    file). In-place updates need writable memory; the copy is what training needs anyway."""
    a = P.data[name]
    if not getattr(a.flags, "writeable", True):  # CuPy arrays have no such flag and are always writable
        a = a.copy()
        P.data[name] = a
    return a


def _split_key(key):
    """'exp_avg.model.x.weight' -> ('exp_avg', 'model.x.weight'); 'step' -> ('step', None)."""
    kind, _, name = key.partition(".")
    return kind, (name or None)


def _problems(missing, unexpected, misshaped):
    """The parts of a name/shape mismatch message, in Params.load_state_dict's wording."""
    return [_listing(what, names) for what, names in
            (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", misshaped)) if names]


def _scalar(state, key, who):
    try:
        return state[key]
    except KeyError:
        raise ValueError(f"{who}.load_state_dict: the state has no {key!r} entry; was it saved by "
                         f"{who}.state_dict()?") from None


# ----------------------------------------------------------------------------------------------------------------
# optimizers

class _Optimizer:
    """What SGD and AdamW share: the parameter list, gradient lookup, zero_grad and (de)serialisation.

    Subclasses set BUFFERS (names of per-parameter state entries), HYPER (hyperparameter attribute names saved
    in the state dict; "lr" is restored on load, the others must match) and implement step().
    """
    BUFFERS = ()
    HYPER = ()

    def __init__(self, params, lr):
        who = type(self).__name__
        if lr < 0:
            raise ValueError(f"{who}: lr must be >= 0, got {lr}")
        self.param_list = _as_list(params, who)
        self.named = _named(self.param_list, who)  # fixed at construction, like torch's param_groups
        for P, name in self.named:
            _check_trainable(who, name, P.data[name])
        self.lr = float(lr)  # may be changed between steps (schedules): opt.lr = ... or step(lr=...)
        self.t = 0  # number of step() calls
        self.state = {}  # name -> {buffer: array, "step": int}; created lazily when a parameter gets its first grad

    def _params_with_grads(self):
        """[(name, p, g)] for every parameter that has a gradient this step; p is writable, updated in place.
        Everything is checked before the first update, so a bad gradient cannot leave a half-applied step."""
        who = type(self).__name__
        out = []
        for P, name in self.named:
            g = P.grads.get(name)
            if g is None:
                continue  # no gradient this step: skip, as torch does for p.grad is None
            p = P.data[name]
            _check_trainable(who, name, p)  # re-checked: params.astype() may have run since construction
            if g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"{who}: gradient for {name!r} is {g.dtype}{tuple(g.shape)} but the parameter is "
                                 f"{p.dtype}{tuple(p.shape)}; train with compute_dtype equal to the storage dtype")
            out.append((name, _writable(P, name), g))
        return out

    def zero_grad(self):
        for P in self.param_list:
            P.zero_grad()

    # ------------------------------------------------------------------------------------------ state dicts
    def state_dict(self):
        """Flat {key: array}: "step", one 0-d float64 array per hyperparameter, "<buffer>.<name>" per buffer
        (live arrays, not copies) and "step.<name>" where a parameter keeps its own count."""
        out = {"step": np.array(self.t, dtype=np.int64)}
        for h in self.HYPER:
            out[h] = np.array(float(getattr(self, h)), dtype=np.float64)
        for name, st in self.state.items():
            for b, v in st.items():
                out[f"{b}.{name}"] = np.array(v, dtype=np.int64) if b == "step" else v
        return out

    def load_state_dict(self, state):
        """Restore a state_dict() so training resumes exactly. The buffers are copied (the given arrays may be
        read-only or still in use). "lr" is restored like torch does (a schedule overrides it on the next step);
        every other saved hyperparameter must equal this optimizer's, so a silent change cannot break the resume.
        Raises ValueError for unknown keys, names that are not parameters, wrong shapes or incomplete state.
        """
        who = type(self).__name__
        params = {name: P.data[name] for P, name in self.named}
        t = int(_scalar(state, "step", who))
        differ = [f"{h}: saved {float(state[h])}, this optimizer {float(getattr(self, h))}"
                  for h in self.HYPER if h != "lr" and h in state and float(state[h]) != float(getattr(self, h))]
        if differ:
            raise ValueError(f"{who}.load_state_dict: hyperparameters differ ({'; '.join(differ)}); build the "
                             f"optimizer with the saved settings, or delete those keys from the state to override")
        per_param, unknown, not_params, misshaped = {}, [], [], []
        for key, v in state.items():
            kind, name = _split_key(key)
            if name is None:
                if kind != "step" and kind not in self.HYPER:
                    unknown.append(key)
            elif kind not in self.BUFFERS:
                unknown.append(key)
            elif name not in params:
                not_params.append(name)
            elif kind != "step" and tuple(v.shape) != tuple(params[name].shape):
                misshaped.append(f"{key}: expected {tuple(params[name].shape)}, got {tuple(v.shape)}")
            else:
                per_param.setdefault(name, {})[kind] = v
        incomplete = [f"{n} (has {sorted(b)})" for n, b in per_param.items() if set(b) != set(self.BUFFERS)]
        problems = []
        if unknown:
            problems.append(_listing(f"unknown keys (a {who} has {', '.join(self.BUFFERS)})", unknown))
        if not_params:
            problems.append(_listing("names that are not parameters of this optimizer", sorted(set(not_params))))
        if misshaped:
            problems.append(_listing("buffers with the wrong shape", misshaped))
        if incomplete:
            problems.append(_listing("parameters with incomplete state", incomplete))
        if problems:
            raise ValueError(f"{who}.load_state_dict: " + "; ".join(problems) +
                             ". Was this state saved for the same model and optimizer?")
        self.t = t
        if "lr" in state:
            self.lr = float(state["lr"])
        self.state = {}
        for name, bufs in per_param.items():
            xp = xp_of(params[name])
            self.state[name] = {b: int(v) if b == "step" else xp.array(v, dtype=params[name].dtype, copy=True)
                                for b, v in bufs.items()}


class SGD(_Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay, as torch.optim.SGD.

    Weight decay here is *coupled* (added to the gradient, so it goes through the momentum), which is what
    torch's SGD does; AdamW below decouples it.
    """
    BUFFERS = ("momentum_buffer",)
    HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov=True needs momentum > 0 and dampening = 0 (as in torch)")
        super().__init__(params, lr)
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)

    def step(self, lr=None):
        """One update of every parameter that has a gradient. lr: set self.lr first (for schedules)."""
        if lr is not None:
            self.lr = float(lr)
        self.t += 1
        for name, p, g in self._params_with_grads():
            d = g
            if self.weight_decay != 0:
                d = g + self.weight_decay * p  # a new array: the caller's gradient stays untouched
            if self.momentum != 0:
                st = self.state.get(name)
                if st is None:
                    # torch starts the buffer at the first gradient itself (not at (1-dampening)*g)
                    buf = d.copy()
                    self.state[name] = {"momentum_buffer": buf}
                else:
                    buf = st["momentum_buffer"]
                    buf *= self.momentum
                    buf += d if self.dampening == 0 else (1 - self.dampening) * d  # skip a pass when it is *1
                d = d + self.momentum * buf if self.nesterov else buf
            p += (-self.lr) * d  # torch: param.add_(d, alpha=-lr)


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), exactly torch.optim.AdamW's default update.

    Memory: two buffers per parameter (exp_avg m, exp_avg_sq v) in the parameter's dtype, i.e. 2x the weights,
    plus two parameter-sized temporaries while one parameter is being updated.
    """
    BUFFERS = ("step", "exp_avg", "exp_avg_sq")
    HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: need 0 <= betas < 1, eps >= 0, weight_decay >= 0; got betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, lr)
        self.beta1, self.beta2 = float(b1), float(b2)
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    @property
    def betas(self):
        return (self.beta1, self.beta2)

    def step(self, lr=None):
        """One update of every parameter that has a gradient. lr: set self.lr first (for schedules).

        The order of operations is torch's _single_tensor_adam, line by line, so float32 results agree to about
        one rounding (torch's vectorised kernels may fuse multiply-adds; measured ~1e-7 relative after 10 steps).
        Python-float scalars meet float32 arrays as float32 (NumPy 2 / NEP 50), as torch's CPU scalars do.
        """
        if lr is not None:
            self.lr = float(lr)
        self.t += 1
        b1, b2, lr, eps = self.beta1, self.beta2, self.lr, self.eps
        for name, p, g in self._params_with_grads():
            xp = xp_of(p)
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {"step": 0, "exp_avg": xp.zeros_like(p), "exp_avg_sq": xp.zeros_like(p)}
            st["step"] += 1
            t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]

            if self.weight_decay != 0:
                p *= 1 - lr * self.weight_decay  # decoupled decay: shrink the weights, not the gradient
            tmp = xp.subtract(g, m)  # scratch (parameter-sized), reused below to avoid more temporaries
            tmp *= 1 - b1
            m += tmp  # m = lerp(m, g, 1-b1) = b1*m + (1-b1)*g, written as torch's lerp computes it
            xp.multiply(g, 1 - b2, out=tmp)
            tmp *= g
            v *= b2
            v += tmp  # v = b2*v + (1-b2)*g*g   (torch: exp_avg_sq.mul_(b2).addcmul_(g, g, value=1-b2))

            bias_correction1 = 1 - b1 ** t  # Python floats (float64), as in torch
            bias_correction2_sqrt = (1 - b2 ** t) ** 0.5
            step_size = lr / bias_correction1
            denom = xp.sqrt(v)
            denom /= bias_correction2_sqrt
            denom += eps  # eps is added *after* the bias correction of sqrt(v), as torch does
            xp.multiply(m, -step_size, out=tmp)
            tmp /= denom
            p += tmp  # torch: param.addcdiv_(m, denom, value=-step_size) = p + (-step_size*m)/denom


# ----------------------------------------------------------------------------------------------------------------
# gradient clipping

_DOT_CHUNK = 1 << 16  # elements per float32 dot product in _sum_of_squares


def _sum_of_squares(g):
    """sum(g**2) as a Python float, accurate for big float32 tensors and at BLAS speed.

    One float32 dot product over a 15M-element gradient is off by ~1e-4 relative (measured: its accumulators
    grow large), and squaring in float64 first costs a float64 copy and is ~10x slower. Dot products over
    64K-element chunks, added in float64, measured 6e-8 relative error at the speed of a single vdot.
    On the GPU the float64 reduction is cheap and one call avoids a host sync per chunk.
    """
    xp = xp_of(g)
    if is_cuda(g):
        return float(xp.sum(xp.square(g, dtype=xp.float64)))
    flat = g.reshape(-1)  # (n,) a view for the contiguous arrays op backwards return
    return sum(float(xp.vdot(flat[i:i + _DOT_CHUNK], flat[i:i + _DOT_CHUNK]))
               for i in range(0, flat.size, _DOT_CHUNK))


def clip_grad_norm(params, max_norm, eps=1e-6):
    """Scale all gradients together so their global L2 norm is at most max_norm. Returns the norm before clipping.

    params: a Params or a list of them; every array in .grads counts (one long vector). As
    torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + eps), and the gradients are multiplied by coef
    when coef < 1 (torch multiplies by min(coef, 1), the same thing). Deviation from torch: a non-finite norm
    (inf/NaN in some gradient) is returned as is and the gradients are left untouched, so the trainer can see it
    and skip the step; torch would multiply by a NaN or zero coefficient.
    """
    plist = _as_list(params, "clip_grad_norm")
    grads = [g for P in plist for g in P.grads.values()]
    total = math.sqrt(sum(_sum_of_squares(g) for g in grads))
    if not math.isfinite(total):
        return total
    coef = float(max_norm) / (total + eps)
    if coef < 1:
        for g in grads:
            g *= coef  # in place: the gradients are owned by Params (fresh arrays from the op backwards)
    return total


# ----------------------------------------------------------------------------------------------------------------
# exponential moving average of the weights

class EMA:
    """Shadow copies of the weights, s <- s - (1-decay_t) * (s - p) after each optimizer step (LDM's LitEma).

    decay_t = min(decay, (1 + t) / (10 + t)) with t = number of updates so far *including this one* (t = 1 on
    the first update, decay_1 = 2/11), when warmup=True (LitEma's use_num_updates=True, SD's setting): early
    averages forget the random init quickly. warmup=False uses decay every time.
    Shadows are float32 (float64 for float64 parameters), whatever the storage dtype. `ema.shadow` is a plain
    {name: array} dict with the parameter names, so it can be saved as an "EMA-only" checkpoint as it is.
    Memory: one extra copy of the weights.
    """

    def __init__(self, params, decay=0.9999, warmup=True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must lie in [0, 1], got {decay}")
        self.param_list = _as_list(params, "EMA")
        self.named = _named(self.param_list, "EMA")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow = {}
        for P, name in self.named:
            a = P.data[name]
            dt = np.float64 if a.dtype == np.float64 else np.float32
            self.shadow[name] = xp_of(a).array(a, dtype=dt, copy=True)

    def current_decay(self, t):
        """The decay used by the t-th update (t counts from 1)."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    def update(self):
        """Move every shadow towards the current weights. Returns the decay used."""
        self.num_updates += 1
        decay = self.current_decay(self.num_updates)
        one_minus_decay = 1.0 - decay
        for P, name in self.named:
            s = self.shadow[name]
            p = P.data[name]
            tmp = s - p.astype(s.dtype, copy=False)  # (s - p), as LitEma writes it
            tmp *= one_minus_decay
            s -= tmp
        return decay

    def _targets(self, params, who):
        """[(Params, name)] of params (default: the tracked ones), checked name for name against the shadows."""
        named = self.named if params is None else _named(_as_list(params, who), who)
        names = {n for _, n in named}
        missing = [n for n in self.shadow if n not in names]
        unexpected = [n for _, n in named if n not in self.shadow]
        misshaped = [f"{n}: expected {tuple(self.shadow[n].shape)}, got {tuple(P.data[n].shape)}"
                     for P, n in named if n in self.shadow and P.data[n].shape != self.shadow[n].shape]
        problems = _problems(missing, unexpected, misshaped)
        if problems:
            raise ValueError(f"{who}: the given params do not match the EMA's: " + "; ".join(problems))
        return named

    def copy_to(self, params=None):
        """Write the shadow weights into params (default: the tracked ones), cast to each storage dtype.
        Use it to export or sample with the EMA weights when the live weights are no longer needed."""
        for P, name in self._targets(params, "EMA.copy_to"):
            dst = _writable(P, name)
            dst[...] = self.shadow[name]  # in place, so anything holding the array sees the new weights

    def swap(self, params=None):
        """Exchange shadow and live weights in place: swap(), sample, swap() again to go on training.
        Needs the storage dtype to equal the shadow's (float32), so nothing is rounded on the way back."""
        named = self._targets(params, "EMA.swap")
        for P, name in named:
            if P.data[name].dtype != self.shadow[name].dtype:
                raise ValueError(f"EMA.swap: {name!r} is stored as {P.data[name].dtype} but the shadow is "
                                 f"{self.shadow[name].dtype}; swapping would round the shadow. Use copy_to() on "
                                 f"a separate inference Params instead")
        for P, name in named:
            p, s = _writable(P, name), self.shadow[name]
            tmp = p.copy()  # one parameter-sized temporary at a time
            p[...] = s
            s[...] = tmp

    def state_dict(self):
        """{"num_updates", "decay", "shadow.<name>"...}; shadows are the live arrays, not copies."""
        out = {"num_updates": np.array(self.num_updates, dtype=np.int64),
               "decay": np.array(self.decay, dtype=np.float64)}
        out.update({f"shadow.{n}": s for n, s in self.shadow.items()})
        return out

    def load_state_dict(self, state):
        """Restore state_dict(): every tracked name must be present with its shape; nothing else may be.
        The decay is restored too (LitEma keeps it as a buffer)."""
        n = int(_scalar(state, "num_updates", "EMA"))
        shadows = {}
        unknown = []
        for key, v in state.items():
            kind, name = _split_key(key)
            if kind == "shadow" and name is not None:
                shadows[name] = v
            elif key not in ("num_updates", "decay"):
                unknown.append(key)
        missing = [k for k in self.shadow if k not in shadows]
        unexpected = [k for k in shadows if k not in self.shadow] + unknown
        misshaped = [f"{k}: expected {tuple(self.shadow[k].shape)}, got {tuple(v.shape)}"
                     for k, v in shadows.items() if k in self.shadow and tuple(v.shape) != self.shadow[k].shape]
        problems = _problems(missing, unexpected, misshaped)
        if problems:
            raise ValueError("EMA.load_state_dict: " + "; ".join(problems) +
                             ". Was this EMA state saved for the same model?")
        self.num_updates = n
        if "decay" in state:
            self.decay = float(state["decay"])
        for k, s in self.shadow.items():
            self.shadow[k] = xp_of(s).array(shadows[k], dtype=s.dtype, copy=True)


# ----------------------------------------------------------------------------------------------------------------
# learning-rate schedule

def lr_warmup_cosine(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate for optimizer step `step` (counted from 0): linear warmup from 0, then cosine decay.

        step <  warmup_steps:  lr = base_lr * step / warmup_steps                    (0 at step 0)
        step >= warmup_steps:  progress = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps))
                               lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + cos(pi * progress))

    So lr = base_lr at the end of warmup, min_lr at total_steps, and min_lr after it (transformers'
    get_cosine_with_min_lr_schedule_with_warmup gives the same values up to total_steps, then its cosine rises
    again; here it stays at min_lr). Use: opt.step(lr=lr_warmup_cosine(opt.t, ...)).
    """
    if step < 0 or warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"lr_warmup_cosine: need step >= 0 and 0 <= warmup_steps <= total_steps, got step={step}, "
                         f"warmup_steps={warmup_steps}, total_steps={total_steps}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
