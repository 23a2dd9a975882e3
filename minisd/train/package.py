"""Package the shipped default model: the trained tiny SD (mnist_ldm) + its evaluation classifier, in float16.

    python -m minisd.train.package --ldm runs/mnist_ldm/model.safetensors \\
        --classifier runs/mnist_classifier/model.safetensors --out minisd/data/default_model.safetensors

The result is one .safetensors file:
  * a complete minisd StableDiffusion ("minisd" metadata; `sdmodel.load_minisd` and `minisd txt2img` read it),
    weights stored as float16 (computed in float32 on load: Params converts on access),
  * the tiny CLIP's image tower and temperature (clip_image.*, clip.logit_scale) for CLIP scores,
  * the MNIST classifier (classifier.*) so `minisd eval` works offline on a fresh install,
  * "minisd_model" metadata: recipes, training steps and times, and the metrics measured on the runs.
load_minisd ignores the extra tensors (it selects the U-Net, VAE and text-encoder prefixes).
"""
import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..io import safetensors
from .checkpoints import load_model_file, write_model_file

MAX_BYTES = 20 * 2**20  # the limit for the committed file


def package_default_model(ldm_path, classifier_path, out_path, dtype="F16"):
    ldm = load_model_file(ldm_path)
    if ldm.kind != "sd":
        raise UserError(f"{ldm_path} is a {ldm.kind} model; --ldm needs the export of an mnist_ldm run")
    clf = load_model_file(classifier_path)
    if clf.kind != "classifier":
        raise UserError(f"{classifier_path} is a {clf.kind} model, not a classifier")
    sd_meta = json.loads(safetensors.read_metadata(ldm_path)["minisd"])
    tensors = dict(ldm.tensors)
    tensors.update(clf.tensors)
    meta = dict(ldm.meta, classifier=clf.meta,
                packaged_from={"ldm": str(ldm_path), "classifier": str(classifier_path), "dtype": dtype})
    out = write_model_file(out_path, tensors, meta, sd_meta=sd_meta, dtype=dtype)
    size = Path(out).stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{out} is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB limit")
    from ..sdmodel import load_minisd
    load_minisd(out)  # must load as a plain minisd SD model
    return out, size


def main(argv=None):
    ap = argparse.ArgumentParser(description="package the default model (tiny MNIST SD + classifier, float16)")
    ap.add_argument("--ldm", required=True, help="RUN/model.safetensors of an mnist_ldm run")
    ap.add_argument("--classifier", required=True, help="RUN/model.safetensors of an mnist_classifier run")
    ap.add_argument("--out", required=True, help="e.g. minisd/data/default_model.safetensors")
    args = ap.parse_args(argv)
    out, size = package_default_model(args.ldm, args.classifier, args.out)
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
