"""The training loop: one for every task, with what a long run on a laptop needs.

    for step in range(start, steps):
        idx  = sampler.next_batch()                  EpochSampler: shuffled epochs, resumable mid-epoch
        lr   = lr_warmup_cosine(step, ...)           linear warmup, cosine decay to min_lr
        loss = task.step(idx, rng)                   forward + hand-written backward; grads in params.grads
        stop if loss or the gradient norm is not finite (the last good checkpoint stays the newest)
        clip_grad_norm -> AdamW.step(lr) -> EMA.update
        every log_every:    one JSON line in RUN/log.jsonl (mean loss of the window, lr, grad norm, it/s)
        every sample_every: evaluation + sample grid RUN/samples/step-XXXXXXXX.png + RUN/loss.png, EMA weights
        every ckpt_every:   RUN/checkpoints/ckpt-XXXXXXXX.safetensors, atomic, keeping the newest keep_last
    end: checkpoint, RUN/model.safetensors (EMA weights), full evaluation, RUN/summary.json

Exact resume. A checkpoint holds the weights, AdamW's moments and step counts, the EMA shadows, the data sampler
(epoch, position, generator state at the epoch start) and the state of the one generator every step draws its
noise, timesteps, dropout and augmentation from, plus the partial log window. `--resume` restores all of it, drops
log lines written after the checkpoint, and continues: the losses it logs are the ones an uninterrupted run logs
(tests/test_train_trainer.py checks this bit for bit). Sample grids draw from their own generator (seeded by the
step) so looking at samples never changes training.

Signals: Ctrl-C (SIGINT) or SIGTERM finish the current step, write a checkpoint and exit; a second Ctrl-C aborts
at once (the previous checkpoint is still complete: checkpoints are written to a temp file and renamed).
"""
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np

from ..datasets import EpochSampler
from ..errors import UserError
from ..optim import EMA, AdamW, clip_grad_norm, lr_warmup_cosine
from . import checkpoints as ck
from .plots import loss_curve, save_png
from .recipes import recipe_differences
from .task import make_task


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/inf; the message names the step and the last good checkpoint."""


class Trainer:
    """trainer = Trainer(recipe, out_dir, data_dir, resume); summary = trainer.run().

    progress: show a tqdm bar; log: where messages go (print). allow_changes: on --resume, accept a recipe that
    differs from the checkpoint's in more than the cadence keys (warns instead of refusing).
    """

    def __init__(self, recipe, out_dir=None, data_dir=None, resume=False, progress=True, log=print,
                 allow_changes=False):
        self.recipe = recipe
        self.out = Path(out_dir or Path("runs") / recipe["name"])
        self.data_dir, self.progress, self.log = data_dir, progress, log
        self.log_path = self.out / "log.jsonl"
        ckpt = self._find_checkpoint(resume, allow_changes)
        meta, tensors = (ckpt[0], ckpt[1]) if ckpt else (None, None)
        frozen = None
        if meta is not None and meta.get("frozen_meta"):
            frozen = {"tensors": ck.split_prefixed(tensors, "frozen/"), "meta": meta["frozen_meta"]}
        self.task = make_task(recipe, data_dir, frozen=frozen, task_state=meta and meta.get("task_state"))
        r = recipe
        self.params = self.task.trainable()
        self.opt = AdamW(self.params, lr=r["lr"], betas=tuple(r["betas"]), eps=r["adam_eps"],
                         weight_decay=r["weight_decay"])
        self.ema = EMA(self.params, decay=r["ema_decay"]) if r["ema_decay"] > 0 else None
        # two generators: the data order (EpochSampler needs one of its own) and everything else a step draws
        self.sampler = EpochSampler(self.task.num_items(), r["batch_size"], np.random.default_rng([r["seed"], 1]))
        self.rng = np.random.default_rng([r["seed"], 2])
        self.step = 0
        self.window = [0.0, 0, 0.0, {}]  # loss sum, steps, grad-norm sum, {extra metric: sum} since the last line
        self.elapsed = 0.0
        if meta is not None:
            self._restore(meta, tensors, ckpt[2])

    # -------------------------------------------------------------------------------------------- setup
    def _find_checkpoint(self, resume, allow_changes):
        existing = ck.list_checkpoints(self.out)
        if not resume:
            if existing:
                raise UserError(f"{self.out} already holds checkpoints of a run (newest: {existing[-1][1].name}). "
                                f"Continue it with --resume, or choose another --out; nothing was changed")
            return None
        removed = ck.clean_temp_files(self.out)
        for p in removed:
            self.log(f"removed {p.name}: a checkpoint write that was interrupted (the previous checkpoint is intact)")
        found = ck.latest_checkpoint(self.out, log=self.log)
        if found is None:
            raise UserError(f"--resume: no checkpoint in {ck.checkpoint_dir(self.out)}; start without --resume")
        meta, tensors, path = found
        saved = meta["recipe"]
        if saved.get("task") != self.recipe["task"]:
            raise UserError(f"{path} is a {saved.get('task')} checkpoint (recipe {saved.get('name')!r}) but recipe "
                            f"{self.recipe['name']!r} trains a {self.recipe['task']}; use the recipe it was made "
                            f"with (saved in {self.out / 'recipe.json'}) or another --out")
        diffs = recipe_differences(saved, self.recipe)
        if diffs:
            listing = "; ".join(f"{k}: checkpoint {json.dumps(a)}, now {json.dumps(b)}" for k, a, b in diffs[:6])
            if not allow_changes:
                raise UserError(f"{path} was made by a different recipe ({len(diffs)} differences: {listing}). "
                                f"Resume with the recipe it was made with (saved in {self.out / 'recipe.json'}), "
                                f"or pass --allow-recipe-change to resume anyway (the run is then not "
                                f"reproducible); nothing was changed")
            self.log(f"warning: resuming with a changed recipe: {listing}")
        if saved.get("steps") != self.recipe["steps"]:
            self.log(f"note: steps changed from {saved.get('steps')} to {self.recipe['steps']}; the cosine schedule "
                     f"is stretched from here on")
        return meta, tensors, path

    def _restore(self, meta, tensors, path):
        for P in self.params:
            P.load_state_dict({k: np.array(tensors["model/" + k]) for k in P.keys()})  # writable copies
        self.opt.load_state_dict(ck.split_prefixed(tensors, "optim/"))
        if self.ema is not None:
            self.ema.load_state_dict(ck.split_prefixed(tensors, "ema/"))
        self.sampler.load_state_dict(meta["sampler"])
        self.rng.bit_generator.state = meta["rng"]
        self.step = int(meta["step"])
        self.window = list(meta["log_window"])
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        self._truncate_log(self.step)
        self.log(f"resumed from {path} at step {self.step} of {self.recipe['steps']}")

    def _truncate_log(self, step):
        """Drop log lines after `step` (they were written after the checkpoint the run continues from)."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut by a kill
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text("".join(s + "\n" for s in keep), encoding="utf-8")
        tmp.replace(self.log_path)

    # -------------------------------------------------------------------------------------------- logging
    def _write(self, record):
        ck.fsync_append(self.log_path, json.dumps(record))

    def _records(self):
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def plot(self):
        rec = [r for r in self._records() if "loss" in r]
        return loss_curve([r["step"] for r in rec], [r["loss"] for r in rec], self.out / "loss.png",
                          title=f"{self.recipe['name']}: training loss (mean of {self.recipe['log_every']} steps)")

    # -------------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self):
        tensors = ck.prefixed("optim/", self.opt.state_dict())
        for P in self.params:
            tensors.update(ck.prefixed("model/", P.state_dict()))
        if self.ema is not None:
            tensors.update(ck.prefixed("ema/", self.ema.state_dict()))
        tensors.update(ck.prefixed("frozen/", self.task.frozen_tensors()))
        meta = {"recipe": self.recipe, "sampler": self.sampler.state_dict(),
                "rng": _plain(self.rng.bit_generator.state), "task_state": self.task.task_state(),
                "frozen_meta": self.task.frozen_meta(), "log_window": self.window, "elapsed_s": self.elapsed}
        return ck.save_checkpoint(self.out, self.step, tensors, meta, self.recipe["keep_last"])

    def _with_ema(self, fn):
        """Run fn() with the EMA weights swapped in (sample grids, evaluation, export), then swap back."""
        if self.ema is None:
            return fn()
        self.ema.swap()
        try:
            return fn()
        finally:
            self.ema.swap()

    def evaluate_and_sample(self, full=False):
        rng = np.random.default_rng([self.recipe["seed"], 3, self.step])  # never the training generator
        metrics = self._with_ema(lambda: self.task.evaluate(full=full))
        grid = self._with_ema(lambda: self.task.sample_grid(rng))
        if grid is not None:
            p = save_png(grid, self.out / "samples" / f"step-{self.step:08d}.png")
            save_png(grid, self.out / "samples" / "latest.png")
            metrics = dict(metrics, grid=str(p.relative_to(self.out)))
        if metrics:
            self._write({"step": self.step, "eval": metrics})
        self.plot()
        return metrics

    def export(self, metrics=None):
        path = self.out / "model.safetensors"
        extra = {"recipe": self.recipe, "step": self.step, "metrics": metrics or {},
                 "train_time_s": round(self.elapsed, 1)}
        self._with_ema(lambda: self.task.export(path, extra))
        return path

    # -------------------------------------------------------------------------------------------- the loop
    def run(self):
        r = self.recipe
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.json").write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        total = r["steps"]
        self._write({"step": self.step, "event": "resume" if self.step else "start", "recipe": r["name"],
                     "parameters": sum(P.num_parameters() for P in self.params)})
        stop = {"signal": None}
        handlers = self._install_signals(stop)
        bar = None
        status = "done"
        try:
            if self.progress:
                from tqdm import tqdm
                bar = tqdm(total=total, initial=self.step, desc=r["name"], unit="step", dynamic_ncols=True)
            t_window = time.perf_counter()
            while self.step < total:
                t0 = time.perf_counter()
                idx = self.sampler.next_batch()
                lr = lr_warmup_cosine(self.step, r["lr"], r["warmup_steps"], total, r["min_lr"])
                self.opt.zero_grad()
                loss, extra = self.task.step(idx, self.rng)
                if not math.isfinite(loss):
                    self._diverged("the loss", loss)
                if r["grad_clip"] > 0:
                    gnorm = clip_grad_norm(self.params, r["grad_clip"])
                else:
                    gnorm = clip_grad_norm(self.params, float("inf"))  # measures only (coef < 1 never holds)
                if not math.isfinite(gnorm):
                    self._diverged("the gradient norm", gnorm)
                self.opt.step(lr=lr)
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                self.elapsed += time.perf_counter() - t0
                self.window[0] += loss
                self.window[1] += 1
                self.window[2] += gnorm
                for k, v in extra.items():
                    self.window[3][k] = self.window[3].get(k, 0.0) + float(v)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.step % r["log_every"] == 0 or self.step == total:
                    now = time.perf_counter()
                    n = self.window[1]
                    self._write({"step": self.step, "loss": self.window[0] / n, "grad_norm": self.window[2] / n,
                                 "lr": lr, "epoch": self.sampler.epoch, "it_s": round(n / (now - t_window), 3),
                                 "time_s": round(self.elapsed, 2), **{k: v / n for k, v in self.window[3].items()}})
                    self.window, t_window = [0.0, 0, 0.0, {}], now
                if self.step % r["sample_every"] == 0 and self.step < total:
                    self.evaluate_and_sample()
                if self.step % r["ckpt_every"] == 0 or self.step == total:
                    self.checkpoint()
                if stop["signal"] is not None and self.step < total:
                    path = self.checkpoint() if self.step % r["ckpt_every"] else ck.list_checkpoints(self.out)[-1][1]
                    self._write({"step": self.step, "event": "interrupted", "signal": stop["signal"]})
                    self.log(f"\ninterrupted at step {self.step}: checkpoint {path}. Continue with the same command "
                             f"and --resume")
                    status = "interrupted"
                    break
        finally:
            if bar is not None:
                bar.close()
            self._restore_signals(handlers)
        if status == "interrupted":
            self.plot()
            return {"status": status, "step": self.step, "out": str(self.out)}
        metrics = self.evaluate_and_sample(full=True)
        path = self.export(metrics)
        summary = {"status": status, "recipe": r["name"], "step": self.step, "train_time_s": round(self.elapsed, 1),
                   "s_per_step": round(self.elapsed / max(1, total), 4), "model": str(path),
                   "metrics": metrics}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        self._write({"step": self.step, "event": "done", "model": str(path)})
        self.log(f"done: {self.step} steps in {self.elapsed / 60:.1f} min; model {path}; "
                 f"metrics {json.dumps({k: v for k, v in metrics.items() if k != 'grid'})}")
        return summary

    def _diverged(self, what, value):
        last = ck.list_checkpoints(self.out)
        where = (f"the last good checkpoint is {last[-1][1]} (step {last[-1][0]})" if last else
                 "no checkpoint was written yet")
        self._write({"step": self.step, "event": "diverged", "what": what})
        r = self.recipe
        lr = lr_warmup_cosine(self.step, r["lr"], r["warmup_steps"], r["steps"], r["min_lr"])
        raise TrainingDiverged(
            f"{what} became {value} at step {self.step + 1} (lr {lr:.3g}); training stopped and nothing was saved "
            f"from this step; {where}. Lower lr or raise warmup_steps / "
            f"grad_clip, then start a new --out, or continue from that checkpoint with --resume --set lr=... "
            f"--allow-recipe-change")

    # -------------------------------------------------------------------------------------------- signals
    @staticmethod
    def _install_signals(stop):
        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers can only be set from the main thread

        def handler(signum, frame):
            if stop["signal"] is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: abort now (the last checkpoint is complete)
            stop["signal"] = signal.Signals(signum).name
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return old

    @staticmethod
    def _restore_signals(old):
        for s, h in (old or {}).items():
            signal.signal(s, h)


def _plain(state):
    """Generator state with arrays as lists, JSON-ready (PCG64's state is plain ints already)."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state


def train(recipe, out_dir=None, data_dir=None, resume=False, progress=True, log=print, allow_changes=False):
    """Build a Trainer and run it; returns its summary dict."""
    return Trainer(recipe, out_dir, data_dir, resume, progress, log, allow_changes).run()
