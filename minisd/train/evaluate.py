"""`minisd eval`'s work: find the evaluation classifier / tiny CLIP for a model, generate, and score (metrics.py).

    evaluate_path(path)   dispatches on the file's kind:
      pixel_ddpm / sd / their checkpoints -> n samples per class: classifier accuracy (overall, per class),
                            Frechet distance of classifier features vs the test set (and fd_real, the same
                            distance for as many real training images: the floor), CLIP score when a tiny CLIP
                            is available (shipped inside the default model)
      classifier          -> test-set accuracy
      clip                -> zero-shot test accuracy with "a handwritten digit <name>"
      vae                 -> test-set reconstruction PSNR, and classifier accuracy on the reconstructions

Where the classifier comes from, in order: --classifier FILE; the classifier shipped inside the model file (the
default model carries one); runs/<dataset>_classifier/model.safetensors. Otherwise a UserError says how to train it.
"""
from pathlib import Path

import numpy as np

from ..datasets import load_dataset
from ..errors import UserError
from .checkpoints import ModelFile, load_model_file
from .classifier import load_classifier
from .clip import CLIPParts, fill
from .data import eval_images, prepare
from .metrics import classifier_report, clip_report, feature_frechet


def _shipped_classifier(model_file):
    """(ConvNet, meta) of the classifier packaged inside a model file (the default model carries one), or None."""
    if model_file is not None and "classifier" in model_file.meta and \
            any(k.startswith("classifier.") for k in model_file.tensors):
        meta = model_file.meta["classifier"]
        return load_classifier(model_file.tensors, meta), meta
    return None


def find_classifier(dataset, classifier_path=None, model_file=None):
    """(ConvNet, its export metadata, where it came from) or a UserError explaining how to get one."""
    if classifier_path is not None:
        mf = load_model_file(classifier_path)
        if mf.kind == "classifier":
            return load_classifier(mf.tensors, mf.meta), mf.meta, str(classifier_path)
        shipped = _shipped_classifier(mf)  # e.g. --classifier minisd/data/default_model.safetensors
        if shipped is None:
            raise UserError(f"--classifier {classifier_path} is a {mf.kind} model, not a classifier, and carries "
                            f"none")
        return shipped + (f"{classifier_path} (shipped classifier)",)
    shipped = _shipped_classifier(model_file)
    if shipped is not None:
        return shipped + (f"{model_file.path} (shipped classifier)",)
    default = Path("runs") / f"{dataset}_classifier" / "model.safetensors"
    if default.is_file():
        mf = load_model_file(default)
        return load_classifier(mf.tensors, mf.meta), mf.meta, str(default)
    # Last resort for MNIST: the classifier inside the model that ships with minisd (trained by the
    # mnist_classifier recipe), so a freshly trained MNIST model can be scored without training one first.
    from .sampling import DEFAULT_MODEL as packaged
    if packaged.is_file():
        mf = load_model_file(packaged)
        shipped = _shipped_classifier(mf)
        if shipped is not None and shipped[1].get("dataset") == dataset:
            return shipped + (f"{packaged} (shipped classifier)",)
    raise UserError(f"no {dataset} classifier found: train it with `minisd train --recipe {dataset}_classifier` "
                    f"(writes {default}) or pass --classifier FILE")


def find_clip(clip_path=None, model_file=None):
    """CLIPParts from --clip FILE or from the tiny CLIP shipped inside an SD model file, else None."""
    if clip_path is not None:
        mf = load_model_file(clip_path)
        if mf.kind != "clip":
            raise UserError(f"--clip {clip_path} is a {mf.kind} model, not a tiny CLIP")
        return CLIPParts.from_file(mf)
    if model_file is not None and "clip" in model_file.meta and "clip.logit_scale" in model_file.tensors:
        return CLIPParts.from_file(ModelFile("clip", model_file.meta["clip"], model_file.tensors, model_file.path))
    return None


def _real(dataset, split, meta, data_dir, n=None, rng=None):
    """Real images of a split in a model's input layout (its recipe's pad/rgb), and labels."""
    images, labels = load_dataset(dataset, split, data_dir=data_dir)
    if n is not None:
        idx = rng.permutation(len(images))[:n]
        images, labels = images[idx], labels[idx]
    r = meta.get("recipe", {})
    x = np.concatenate([prepare(images[s:s + 1000], r.get("pad", 0), r.get("rgb", False))
                        for s in range(0, len(images), 1000)])
    return x, labels


def evaluate_generator(gen, n_per_class=100, seed=0, classifier_path=None, clip_path=None, data_dir=None,
                       batch=250, guidance=None, sampler=None, steps=None, template=None, progress=True):
    """Generate n_per_class samples of every class and score them. Returns (report dict, images)."""
    from .sampling import CLASS_PROMPT
    dataset = gen.meta.get("dataset", "mnist")
    clf, clf_meta, clf_src = find_classifier(dataset, classifier_path, gen.extras)
    clip = find_clip(clip_path, gen.extras) or getattr(gen, "clip", None)
    K = len(gen.class_names)
    template = template or CLASS_PROMPT
    if gen.conditioning == "none":
        labels = np.full(n_per_class * K, -1)
    else:
        labels = np.repeat(np.arange(K), n_per_class)
    rng = np.random.default_rng(seed)
    kw = dict(guidance=guidance, sampler=sampler, steps=steps)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(labels), desc="generating", unit="img")
    chunks = []
    for s in range(0, len(labels), batch):
        lab = labels[s:s + batch]
        if gen.conditioning == "none":
            chunks.append(gen.sample(np.zeros(len(lab), np.int64), rng, **kw))
        else:
            chunks.append(gen.sample_classes(lab, rng, template=template, **kw))
        if bar is not None:
            bar.update(len(lab))
    if bar is not None:
        bar.close()
    images = np.concatenate(chunks)
    shape = tuple(clf_meta["input_shape"])
    x_clf = eval_images(images, shape)
    test_x, _ = _real(dataset, "test", clf_meta, data_dir)
    _, test_feat = clf.predict(test_x)
    real_x, _ = _real(dataset, "train", clf_meta, data_dir, n=len(labels), rng=np.random.default_rng(seed + 1))
    _, real_feat = clf.predict(real_x)
    if gen.conditioning == "none":
        logits, feats = clf.predict(x_clf)
        pred = logits.argmax(axis=1)
        report = {"frechet_distance": feature_frechet(feats, test_feat), "samples": int(len(labels)),
                  "predicted_class_histogram": np.bincount(pred, minlength=K).tolist()}
    else:
        report = classifier_report(clf, x_clf, labels, test_feat, K)
    report["fd_real"] = feature_frechet(real_feat, test_feat)
    report["classifier"] = clf_src
    report["classifier_test_accuracy"] = clf_meta.get("metrics", {}).get("test_accuracy")
    if clip is not None and gen.conditioning != "none":
        cshape = tuple(gen.meta.get("clip", {}).get("image_shape") or clip_image_shape(clip))
        prompts = [gen.prompt(int(k), template) for k in labels]
        report.update(clip_report(clip, eval_images(images, cshape), prompts,
                                  [gen.prompt(k, template) for k in range(K)], labels))
    d = gen.defaults
    report["sampling"] = {"sampler": sampler or d["sampler"], "steps": steps or d["steps"],
                          "guidance_scale": d["guidance_scale"] if guidance is None else guidance,
                          "seed": seed, "prompt_template": template if gen.conditioning == "text" else None}
    report["model"] = gen.source
    return report, images


def clip_image_shape(clip):
    return (clip.image.config.in_channels, 28, 28)


def evaluate_path(path=None, data_dir=None, classifier_path=None, clip_path=None, **kw):
    """Evaluate whatever model `path` holds (None: the default model). Returns (report, images or None)."""
    from .sampling import load_generator, resolve_model_path
    path = resolve_model_path(path)
    mf = load_model_file(path)
    if mf.kind in ("pixel_ddpm", "sd", "checkpoint"):
        return evaluate_generator(load_generator(path), data_dir=data_dir, classifier_path=classifier_path,
                                  clip_path=clip_path, **kw)
    dataset = mf.meta.get("dataset", "mnist")
    if mf.kind == "classifier":
        clf = load_classifier(mf.tensors, mf.meta)
        x, y = _real(dataset, "test", mf.meta, data_dir)
        logits, _ = clf.predict(x)
        return {"test_accuracy": float((logits.argmax(1) == y).mean()), "test_images": int(len(y)),
                "model": str(path)}, None
    if mf.kind == "clip":
        clip = CLIPParts.from_file(mf)
        x, y = _real(dataset, "test", mf.meta, data_dir)
        names = mf.meta["class_names"]
        out = {"model": str(path), "test_images": int(len(y))}
        for t in dict.fromkeys([mf.meta.get("zero_shot_template", "a handwritten digit {name}")] + mf.meta["captions"]):
            pred = clip.zero_shot(x, names, template=t)
            out.setdefault("zero_shot_accuracy", float((pred == y).mean()))  # the first: the reported template
            out.setdefault("per_template", {})[t] = float((pred == y).mean())
        return out, None
    if mf.kind == "vae":
        from ..models.vae import VAE
        from .recipes import build_config
        vae = VAE(build_config("vae", mf.meta["vae"]), params=mf.params("first_stage_model."))
        x, y = _real(dataset, "test", mf.meta, data_dir)
        xr = np.concatenate([vae.decode(vae.encode(x[s:s + 250])[0].mean)[0] for s in range(0, len(x), 250)])
        xr = np.clip(xr, -1, 1)
        mse01 = float(np.mean(((xr - x) / 2) ** 2))
        out = {"model": str(path), "test_mse": mse01, "test_psnr_db": float(10 * np.log10(1 / mse01)),
               "test_images": int(len(y))}
        try:
            clf, clf_meta, src = find_classifier(dataset, classifier_path)
        except UserError:
            return out, None
        shape = tuple(clf_meta["input_shape"])
        acc_rec = (clf.predict(eval_images(xr, shape))[0].argmax(1) == y).mean()
        acc_in = (clf.predict(eval_images(x, shape))[0].argmax(1) == y).mean()
        out.update({"classifier": src, "accuracy_on_reconstructions": float(acc_rec),
                    "accuracy_on_inputs": float(acc_in)})
        return out, None
    raise UserError(f"{path}: nothing to evaluate for a {mf.kind} file")


def class_prompts(names, template):
    return [fill(template, k, names) for k in range(len(names))]
