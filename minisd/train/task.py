"""What the trainer asks of a task (classifier, pixel DDPM, VAE, CLIP, latent DDPM), and the registry of tasks.

A task owns its models and data and knows its loss; the trainer (trainer.py) owns everything generic: optimizer,
schedule, clipping, EMA, logging, checkpoints. The contract:

    task.models          {name: model with .params}: what is trained (and what the EMA tracks)
    task.step(idx, rng)  one forward + backward on the batch of dataset indices idx (B,); gradients are left in
                         each model's params.grads; returns (loss float, {extra metrics})
    task.evaluate()      metrics on held-out data with the current (EMA) weights, e.g. {"test_accuracy": 0.99}
    task.sample_grid(rng) uint8 (H, W, 3) PNG-ready grid of samples or reconstructions, or None
    task.frozen_tensors()  {name: array} of pretrained parts that are not trained but needed to resume / sample
                         (the latent model's VAE and text encoder): saved in every checkpoint, with
    task.frozen_meta()   their metadata; a task built from a checkpoint gets both back as frozen={"tensors",
                         "meta"} instead of reading the pretrained files again
    task.task_state()    small JSON state fixed at the start of training (e.g. the latent scale factor)
    task.export_meta()   JSON metadata of the exported model file ("minisd_model")

All randomness of a step comes from the `rng` argument, drawn in a fixed order, so a resumed run draws exactly the
numbers an uninterrupted one would (trainer.py saves the generator state in each checkpoint).
"""
import numpy as np

from ..errors import UserError
from .data import TrainData

TASK_CLASSES = {}


def register(kind):
    def deco(cls):
        cls.kind = kind
        TASK_CLASSES[kind] = cls
        return cls
    return deco


def make_task(recipe, data_dir=None, frozen=None, task_state=None, load_data=True):
    """Build the task of a validated recipe. frozen / task_state: from a checkpoint (resume, sampling)."""
    # importing the modules registers their tasks
    from . import autoencoder, classifier, clip, diffusion  # noqa: F401
    return TASK_CLASSES[recipe["task"]](recipe, data_dir=data_dir, frozen=frozen, task_state=task_state,
                                        load_data=load_data)


class Task:
    kind = None

    def __init__(self, recipe, data_dir=None, frozen=None, task_state=None, load_data=True):
        self.recipe = recipe
        self.data_dir = data_dir
        self.frozen = frozen  # {name: array} from a checkpoint, or None: load pretrained parts from their files
        self.state = dict(task_state or {})
        # the model initialisation has its own generator: changing the data order or noise does not change init
        self.init_rng = np.random.default_rng([recipe["seed"], 0])
        self.data = TrainData(recipe, data_dir) if load_data else DataInfo(recipe)
        self.has_data = bool(load_data)
        self._test = None
        self.models = {}
        self.build()

    # ------------------------------------------------------------------------------------------ for subclasses
    def build(self):
        raise NotImplementedError

    def step(self, idx, rng):
        raise NotImplementedError

    def evaluate(self, full=False):
        return {}

    def sample_grid(self, rng):
        return None

    def frozen_tensors(self):
        return {}

    def frozen_meta(self):
        return {}

    def task_state(self):
        return dict(self.state)

    def export_meta(self):
        raise NotImplementedError

    def export(self, path, extra):
        """Write the exported model file (the trainer swaps the EMA weights in first). extra: recipe, step,
        metrics, training time, merged into the metadata."""
        from .checkpoints import write_model_file
        return write_model_file(path, self.export_tensors(), dict(self.export_meta(), **extra))

    def export_tensors(self):
        """Tensors of the exported model file: the (EMA-swapped) trained weights and the frozen parts."""
        out = {}
        for m in self.models.values():
            out.update(m.params.state_dict())
        out.update(self.frozen_tensors())
        return out

    # ------------------------------------------------------------------------------------------ shared helpers
    def trainable(self):
        return [m.params for m in self.models.values()]

    def num_items(self):
        return len(self.data)

    def test_data(self):
        if self._test is None:
            self._test = TrainData(self.recipe, self.data_dir, split="test")
        return self._test

    def error(self, msg):
        return UserError(f"recipe {self.recipe['name']!r}: {msg}")


# (C, H, W) as stored, for building models without loading the data (sampling from a checkpoint)
RAW_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class DataInfo:
    """The shape facts of a dataset without its images (sampling and exporting need no data)."""

    def __init__(self, recipe):
        from ..datasets import CLASS_NAMES
        self.dataset, self.pad, self.rgb = recipe["dataset"], recipe["pad"], recipe["rgb"]
        self.raw_shape = RAW_SHAPES[self.dataset]
        self.class_names = CLASS_NAMES[self.dataset]

    @property
    def image_shape(self):
        C, H, W = self.raw_shape
        return (3 if self.rgb else C, H + 2 * self.pad, W + 2 * self.pad)

    def __len__(self):
        raise UserError("this task was built without its data (load_data=False)")
