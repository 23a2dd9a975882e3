"""`minisd convert IN OUT`: any Stable Diffusion checkpoint minisd reads -> one minisd-format .safetensors file.

    minisd convert v1-5-pruned.ckpt sd15.safetensors --extract-ema --dtype fp16
    minisd convert ./stable-diffusion-2-1/ sd21.safetensors          # a diffusers folder

IN: an original single file (.ckpt/.pt/.pth read by a restricted unpickler that never runs code from the file, or
.safetensors), a diffusers folder, or a minisd file. OUT: tensors under their original LDM names plus every config
(U-Net, VAE, text encoder, scheduler, tokenizer padding) as JSON metadata, so `--ckpt OUT` needs nothing else.
The file is written atomically; an existing OUT is kept unless --overwrite is given.
"""
import sys


def configure(parser):
    parser.add_argument("input", metavar="IN", help="checkpoint file (.ckpt/.safetensors/...) or diffusers folder")
    parser.add_argument("output", metavar="OUT", help="the minisd model to write (.safetensors)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                        help="storage precision of OUT (default fp32; fp16 halves the size; minisd always computes "
                             "in fp32)")
    parser.add_argument("--extract-ema", action="store_true",
                        help="use the EMA weights (model_ema.*) of a single-file checkpoint that has them "
                             "(usually better for inference; default: the regular weights, as diffusers)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="override the detected prediction type (SD 2.x single files: v_prediction unless the "
                             "checkpoint's global_step is 875000, the 512-px base model, as diffusers decides)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args):
    from weights_convert.convert import convert
    model = convert(args.input, args.output, dtype=args.dtype, extract_ema=args.extract_ema,
                    overwrite=args.overwrite, prediction_type=args.prediction_type)
    n = model.num_parameters()
    print(f"wrote {args.output}: {model.name} ({model.prediction_type}); parameters: U-Net {n['unet']:,}, "
          f"VAE {n['vae']:,}, text encoder {n['text_encoder']:,}; default sampler {model.default_sampler}",
          file=sys.stderr)
    return 0
