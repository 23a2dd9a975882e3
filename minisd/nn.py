"""Parameters: named arrays and their gradients. The only state a minisd model has.

There is no autograd engine and no Module tree. A model part (U-Net, VAE, text encoder) owns one `Params`:
a flat, ordered mapping from the *full original checkpoint key* to an array, e.g.

    model.diffusion_model.input_blocks.1.0.in_layers.0.weight -> (320, 320, 3, 3)
    first_stage_model.decoder.up.3.block.0.norm1.weight        -> (512,)

so an SD 1.x single-file checkpoint loads with no renaming (../docs/style.md principle 7).

Gradient convention (stated once, used everywhere): op backwards *return* their gradients; model and block
backwards hand each parameter gradient to `Params.add_grad(name, g)`, which stores it the first time and
adds it when a parameter is used more than once. Residual and skip connections add their incoming
gradients in the block code. `zero_grad()` forgets all gradients.

Storage vs compute dtype: arrays may be stored in float16 (half the memory of a 4 GB fp32 checkpoint) while
every op computes in `compute_dtype` (float32 by default, float64 for gradient checks); `params[name]`
returns the compute-dtype array, converting on access when the two differ.
"""
import numpy as np

from .backend import xp_of


class Params:
    """Ordered name -> array mapping with gradients, strict loading and dtype control."""

    def __init__(self, tensors=None, compute_dtype=np.float32):
        self.data = dict(tensors or {})  # name -> storage array (checkpoint key order kept)
        self.grads = {}  # name -> gradient in compute dtype (only for parameters that got one)
        self.compute_dtype = np.dtype(compute_dtype)

    # ------------------------------------------------------------------------------------------ mapping access
    def __getitem__(self, name):
        try:
            a = self.data[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r} ({len(self.data)} parameters; "
                           f"first few: {list(self.data)[:3]})") from None
        if a.dtype != self.compute_dtype:
            a = a.astype(self.compute_dtype)  # fp16 storage -> fp32 compute, one tensor at a time
        return a

    def get(self, name, default=None):
        return self[name] if name in self.data else default

    def __contains__(self, name):
        return name in self.data

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return iter(self.data)

    def keys(self):
        return self.data.keys()

    def shapes(self):
        """{name: shape} of every parameter (what `from_weights` style config inference reads)."""
        return {k: tuple(v.shape) for k, v in self.data.items()}

    def num_parameters(self, prefix=""):
        return int(sum(v.size for k, v in self.data.items() if k.startswith(prefix)))

    # ------------------------------------------------------------------------------------------ gradients
    def add_grad(self, name, g):
        """Accumulate gradient g (a fresh array owned by the caller's op) for parameter `name`."""
        if name not in self.data:
            raise KeyError(f"add_grad: {name!r} is not a parameter")
        if g.shape != self.data[name].shape:
            raise ValueError(f"add_grad: gradient for {name!r} has shape {g.shape}, "
                             f"parameter has {self.data[name].shape}")
        if g.dtype != self.compute_dtype:  # never promote silently (a float64 grad in a float32 model is a bug)
            raise ValueError(f"add_grad: gradient for {name!r} has dtype {g.dtype}, "
                             f"expected the compute dtype {self.compute_dtype}")
        old = self.grads.get(name)
        if old is None:
            self.grads[name] = g
        else:
            old += g

    def zero_grad(self):
        self.grads = {}

    # ------------------------------------------------------------------------------------------ state dicts
    def state_dict(self):
        """The storage arrays themselves (not copies), in key order."""
        return dict(self.data)

    def load_state_dict(self, state, strict=True, dtype=None):
        """Replace parameters by those in `state` (a dict name -> array).

        Names and shapes must match exactly; with strict=False, missing names keep their current value and
        unexpected names are ignored, but shape mismatches are still errors. dtype: convert while loading
        (e.g. np.float16 storage); None keeps the given dtype (float32 and float16 are both fine).
        Raises ValueError listing the first few missing / unexpected / mis-shaped names and their counts.
        Arrays needing no conversion are kept, not copied (a memory-mapped checkpoint stays mapped and read-only
        until an optimizer copies it): loading another live Params' state_dict() makes the two share arrays, so
        pass copies ({k: v.copy() ...}) if both will change.
        """
        missing = [k for k in self.data if k not in state]
        unexpected = [k for k in state if k not in self.data]
        misshaped = [f"{k}: expected {tuple(self.data[k].shape)}, got {tuple(state[k].shape)}"
                     for k in self.data if k in state and tuple(state[k].shape) != tuple(self.data[k].shape)]
        problems = []
        if strict and missing:
            problems.append(_listing("missing", missing))
        if strict and unexpected:
            problems.append(_listing("unexpected", unexpected))
        if misshaped:
            problems.append(_listing("with the wrong shape", misshaped))
        if problems:
            raise ValueError("load_state_dict: " + "; ".join(problems) +
                             ". Is this checkpoint for the same model and config? (minisd convert can rename "
                             "diffusers-layout files; see weights_convert/)")
        for k in self.data:
            if k in state:
                a = state[k]
                xp = xp_of(a)
                if dtype is not None:
                    a = a.astype(dtype)
                elif a.dtype not in (np.float16, np.float32, np.float64):
                    a = a.astype(self.compute_dtype)  # e.g. bfloat16 read as float32 by the loader
                self.data[k] = xp.ascontiguousarray(a)
        self.grads = {}

    def astype(self, dtype):
        """Convert the storage of every parameter in place (e.g. float16 to halve memory). Returns self."""
        self.data = {k: v.astype(dtype) for k, v in self.data.items()}
        self.grads = {}
        return self

    def to(self, xp):
        """Move every parameter to the array module xp (numpy or cupy), once. Returns self."""
        if xp is np:
            from .backend import to_numpy
            self.data = {k: to_numpy(v) for k, v in self.data.items()}
        else:
            self.data = {k: xp.asarray(v) for k, v in self.data.items()}
        self.grads = {}
        return self


def _listing(what, names, first=5):
    head = ", ".join(names[:first])
    more = f", ... ({len(names) - first} more)" if len(names) > first else ""
    return f"{len(names)} {what} ({head}{more})"


# --------------------------------------------------------------------------------------------------------------
# initialisation (PyTorch's defaults, so a freshly built minisd model trains like its PyTorch twin)

def init_uniform_fan_in(shape, rng, dtype=np.float32):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv2d weights (kaiming_uniform with
    a=sqrt(5) reduces to this bound) and biases. fan_in = prod(shape[1:]) for a weight (out, in, ...)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_params(shapes, rng, dtype=np.float32, zero=(), normal=()):
    """Build a {name: array} dict from {name: shape} with PyTorch default initialisation.

    Rules, by name: '*.weight' of ndim >= 2 -> uniform fan-in; the matching '*.bias' -> uniform with that
    weight's fan-in; 1-D '*.weight' (norm scales) -> ones; other 1-D '*.bias' -> zeros. Names in `zero`
    (or ending with one of its entries) start at zero (SD's zero_module outputs); names in `normal`
    start at N(0, 0.02) (embeddings, as CLIP initialises them).
    """
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if any(name == z or name.endswith(z) for z in zero):
            out[name] = np.zeros(shape, dtype)
        elif any(name == z or name.endswith(z) for z in normal):
            out[name] = (0.02 * rng.standard_normal(shape)).astype(dtype)
        elif name.endswith("weight") and len(shape) >= 2:
            out[name] = init_uniform_fan_in(shape, rng, dtype)
        elif name.endswith("bias"):
            w = shapes.get(name[: -len("bias")] + "weight")
            if w is not None and len(w) >= 2:
                bound = 1.0 / np.sqrt(int(np.prod(w[1:])))
                out[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
            else:
                out[name] = np.zeros(shape, dtype)
        elif len(shape) == 1:
            out[name] = np.ones(shape, dtype)
        else:
            out[name] = (0.02 * rng.standard_normal(shape)).astype(dtype)
    return out
