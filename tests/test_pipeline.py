"""minisd.pipeline against diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: same weights, same
initial noise -> the same 8-bit image (max pixel difference <= 1/255, the must-show bound is < 2/255).

The reference pipelines are built fully offline from diffusers/transformers components with random weights
(tests/fixtures/make_sd_fixtures.py); minisd loads the *files* written from them (single .safetensors, .ckpt,
diffusers folders fp32 / fp16), so loading and sampling are checked together. The fast tests use tiny models with
SD 1.x / SD 2.x structure (SD 2.x: v-prediction, linear projections, heads of 64, GELU text encoder with the
penultimate layer); the slow tests use the full SD 1.5 and SD 2.1 architectures.

Random weights are scaled so images are not saturated; test_images_are_informative checks that (and that a
perturbed weight changes the image), so agreement is not trivially reached on all-black or all-white images.
"""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest

from minisd import pipeline as P
from minisd.errors import UserError
from minisd.testing import rel_error
from weights_convert.load import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
fx = pytest.importorskip("make_sd_fixtures")

PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall"]
NEGATIVE = ["blurry", "low quality"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = {}
    for family in ("sd1", "sd2"):
        d = tmp_path_factory.mktemp(family)
        comps = fx.components(family)
        state = fx.to_ldm_state_dict(comps)
        fx.save_safetensors(state, d / "model.safetensors")
        fx.save_ckpt(fx.with_extras(state), d / "model.ckpt", global_step=470000 if family == "sd1" else 110000)
        fx.save_diffusers(comps, d / "diffusers")
        fx.save_diffusers(comps, d / "diffusers_fp16", fp16=True)
        out[family] = (comps, d)
    return out


def fp16_rounded(comps, inplace=False):
    """The components with weights rounded to float16 and computed in float32 (what an fp16 file holds).
    inplace: round the given modules themselves (full-size models: saves a 4 GB copy)."""
    import torch
    c = dict(comps)
    for k in ("unet", "vae", "text_encoder"):
        m = comps[k] if inplace else copy.deepcopy(comps[k])
        c[k] = m.to(torch.float16).to(torch.float32)
    return c


def torch_latents(shape, seed):
    import torch
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int64)


def ref_pixels(np_images):
    """diffusers output_type="np" (float in [0, 1]) -> the uint8 values its PIL output would have."""
    return np.round(np_images * 255).astype(np.int64)


def run_pair(comps, model, prompts, H, W, steps=3, guidance=7.5, sampler="ddim", karras=False, negative=None,
             num_images=1, guidance_rescale=0.0, seed=0):
    """(minisd Result, diffusers uint8 images, diffusers final latents) from the same initial latents."""
    f = model.vae_scale_factor
    n = len(prompts) * num_images
    lat = torch_latents((n, 4, H // f, W // f), seed)
    pipe = fx.pipeline(comps, sampler)
    if karras:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_karras_sigmas=True)
    kw = dict(height=H, width=W, num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative,
              num_images_per_prompt=num_images, guidance_rescale=guidance_rescale)
    last = {}

    def keep_latents(_pipe, _i, _t, tensors):  # the latents after every step; the last ones are the final latents
        last["latents"] = tensors["latents"].clone()
        return tensors

    ref = pipe(prompts, latents=lat.clone(), output_type="np", callback_on_step_end=keep_latents,
               callback_on_step_end_tensor_inputs=["latents"], **kw).images
    ref_lat = last["latents"].numpy()
    res = P.txt2img(model, prompts, negative_prompt=negative, steps=steps, sampler=sampler, karras=karras,
                    guidance=guidance, guidance_rescale=guidance_rescale, height=H, width=W, num_images=num_images,
                    latents=lat.numpy(), progress=False)
    return res, ref_pixels(ref), ref_lat


# ------------------------------------------------------------------------------------------------ txt2img

@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("form", ["model.safetensors", "model.ckpt", "diffusers", "diffusers_fp16"])
def test_txt2img_matches_diffusers(tiny, family, form):
    comps, d = tiny[family]
    model = load_model(d / form)
    ref_comps = fp16_rounded(comps) if form.endswith("fp16") else comps
    res, ref, ref_lat = run_pair(ref_comps, model, PROMPTS, 32, 48, negative=NEGATIVE)
    assert len(res.images) == 2 and res.images[0].size == (48, 32)
    # float32 through 3 guided steps: the latents agree to ~1e-6 relative (bound with margin); pixels within 1/255
    assert rel_error(res.latents, ref_lat) < 1e-4
    assert np.abs(pixels(res.images) - ref).max() <= 1


@pytest.mark.parametrize("sampler,karras", [("pndm", False), ("euler", False), ("dpmpp_2m", True)])
def test_other_samplers_match_diffusers(tiny, sampler, karras):
    comps, d = tiny["sd1"]
    model = load_model(d / "model.safetensors")
    res, ref, ref_lat = run_pair(comps, model, PROMPTS[:1], 32, 32, steps=4, sampler=sampler, karras=karras)
    assert rel_error(res.latents, ref_lat) < 1e-4
    assert np.abs(pixels(res.images) - ref).max() <= 1


@pytest.mark.parametrize("guidance,rescale,num_images", [(1.0, 0.0, 1), (5.0, 0.7, 2)])
def test_guidance_off_rescale_and_images_per_prompt(tiny, guidance, rescale, num_images):
    comps, d = tiny["sd2"]
    model = load_model(d / "model.safetensors")
    res, ref, ref_lat = run_pair(comps, model, PROMPTS, 32, 32, guidance=guidance, guidance_rescale=rescale,
                                 num_images=num_images, negative=None)
    assert len(res.images) == 2 * num_images
    assert rel_error(res.latents, ref_lat) < 1e-4
    assert np.abs(pixels(res.images) - ref).max() <= 1


def test_images_are_informative(tiny):
    """Agreement must not come from saturated images: the images vary, few pixels are clamped, and perturbing one
    U-Net weight changes the result visibly."""
    comps, d = tiny["sd1"]
    model = load_model(d / "model.safetensors")
    lat = torch_latents((1, 4, 16, 16), 3).numpy()
    base = pixels(P.txt2img(model, PROMPTS[0], steps=3, sampler="ddim", latents=lat, progress=False).images)
    assert 0.05 < base.std() / 255 < 0.45
    assert np.mean((base == 0) | (base == 255)) < 0.05
    key = "model.diffusion_model.output_blocks.1.0.out_layers.3.weight"
    w = model.unet.params.data[key]
    model.unet.params.data[key] = w + np.float32(0.5) * np.std(w)
    changed = pixels(P.txt2img(model, PROMPTS[0], steps=3, sampler="ddim", latents=lat, progress=False).images)
    assert np.abs(changed - base).max() > 10


def test_seed_callback_and_defaults(tiny):
    comps, d = tiny["sd1"]
    model = load_model(d / "diffusers")
    seen = []
    r1 = P.txt2img(model, "a cat", steps=2, sampler="ddim", seed=5, callback=lambda i, t, x: seen.append((i, x.shape)),
                   progress=False)
    assert [i for i, _ in seen] == [0, 1] and seen[0][1] == (1, 4, 8, 8)  # the folder's sample_size 8 -> 16 px
    assert r1.images[0].size == (16, 16) and r1.parameters["seed"] == 5 and r1.parameters["sampler"] == "ddim"
    r2 = P.txt2img(model, "a cat", steps=2, sampler="ddim", seed=5, progress=False)
    r3 = P.txt2img(model, "a cat", steps=2, sampler="ddim", seed=6, progress=False)
    np.testing.assert_array_equal(pixels(r1.images), pixels(r2.images))
    assert np.abs(pixels(r1.images) - pixels(r3.images)).max() > 0
    assert P.txt2img(model, "a cat", steps=1, seed=1, progress=False).parameters["sampler"] == "pndm"  # checkpoint's
    tiled = P.txt2img(model, "a cat", steps=2, sampler="ddim", seed=5, height=32, width=32, vae_tile=8,
                      progress=False)
    full = P.txt2img(model, "a cat", steps=2, sampler="ddim", seed=5, height=32, width=32, progress=False)
    np.testing.assert_allclose(tiled.latents, full.latents)  # tiling only changes the decode
    assert np.abs(pixels(tiled.images) - pixels(full.images)).mean() < 40  # close, not equal (seams blended)


# ------------------------------------------------------------------------------------------------ img2img

def init_image(H, W):
    from PIL import Image
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 255 // W, yy * 255 // H, ((xx // 4 + yy // 4) % 2) * 200], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def run_img2img_pair(comps, model, H, W, strength=0.6, steps=5, guidance=7.5, sampler="ddim", seed=0):
    import torch
    img = init_image(H, W)
    f = model.vae_scale_factor
    pipe = fx.pipeline(comps, sampler, img2img=True)
    kw = dict(image=img, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
              negative_prompt=NEGATIVE)
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images
    # diffusers draws from its generator: first the VAE posterior sample (one image), then the added noise
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn((1, 4, H // f, W // f), generator=g).numpy()
    noise = torch.randn((2, 4, H // f, W // f), generator=g).numpy()
    res = P.img2img(model, PROMPTS, img, strength=strength, negative_prompt=NEGATIVE, steps=steps, sampler=sampler,
                    guidance=guidance, encode_noise=enc, noise=noise, progress=False)
    return res, ref_pixels(ref)


@pytest.mark.parametrize("family,sampler", [("sd1", "ddim"), ("sd2", "ddim"), ("sd1", "dpmpp_2m")])
def test_img2img_matches_diffusers(tiny, family, sampler):
    comps, d = tiny[family]
    model = load_model(d / "model.ckpt")
    res, ref = run_img2img_pair(comps, model, 32, 32, sampler=sampler)
    assert np.abs(pixels(res.images) - ref).max() <= 1
    assert res.parameters["strength"] == 0.6


def test_img2img_strength_ends(tiny):
    comps, d = tiny["sd1"]
    model = load_model(d / "model.safetensors")
    img = init_image(32, 32)
    r0 = P.img2img(model, "x", img, strength=0.0, steps=4, seed=0, progress=False)
    # strength 0: no denoising; the result is the VAE's reconstruction of the image (posterior sample)
    post, _ = model.vae.encode(P.from_pil(img))
    assert r0.latents.shape == post.mean.shape
    with pytest.raises(UserError, match="strength"):
        P.img2img(model, "x", img, strength=1.5, steps=4)
    with pytest.raises(UserError, match="multiple of 4"):
        P.img2img(model, "x", init_image(30, 32), strength=0.5, steps=4)


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input(tiny):
    _, d = tiny["sd1"]
    model = load_model(d / "model.safetensors")
    with pytest.raises(UserError, match="multiple of 4"):  # tiny: VAE x2, U-Net x2
        P.txt2img(model, "x", height=30, width=32, steps=1)
    with pytest.raises(UserError, match="latents must have shape"):
        P.txt2img(model, "x", latents=np.zeros((2, 4, 8, 8), np.float32), steps=1)
    with pytest.raises(UserError, match="unknown sampler"):
        P.txt2img(model, "x", sampler="heun", steps=1)
    with pytest.raises(UserError, match="karras"):
        P.txt2img(model, "x", sampler="ddim", karras=True, steps=1)
    with pytest.raises(UserError, match="negative_prompt has 3"):
        P.txt2img(model, ["a", "b"], negative_prompt=["x", "y", "z"], steps=1)
    with pytest.raises(UserError, match="steps"):
        P.txt2img(model, "x", steps=0)
    with pytest.raises(UserError, match="NaN"):
        P.txt2img(model, "x", latents=np.full((1, 4, 8, 8), np.nan, np.float32), steps=1)


def test_use_device_cuda_without_gpu(tiny, monkeypatch):
    _, d = tiny["sd1"]
    model = load_model(d / "model.safetensors")
    import importlib.util
    have = importlib.util.find_spec("cupy") is not None
    if have:
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                pytest.skip("a GPU is present")
        except Exception:
            pass
    with pytest.raises(UserError, match="--device cuda needs CuPy and an NVIDIA GPU"):
        P.use_device(model, "cuda")


# ------------------------------------------------------------------------------------------------ full size (slow)
# SD 2.1 first, then SD 1.5: test_verify.py reuses the SD 1.5 build that is still cached afterwards.

def _keys(shared_dir, which):
    out = {}
    for line in open(shared_dir / f"data/sd_keys/{which}_ldm_expected_keys.txt"):
        k, shape = line.split(" ", 1)
        out[k] = tuple(int(s) for s in shape.strip()[1:-1].split(",") if s.strip())
    return out


@pytest.mark.slow
def test_sd21_full_v_prediction(shared_dir):
    pytest.importorskip("diffusers")
    b = fx.full_build("sd2")
    comps, d = b["comps"], b["dir"]
    m = load_model(d / "model.ckpt")  # global_step 110000: v-prediction (2.1-v)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == _keys(shared_dir, "sd2")
    assert m.prediction_type == "v_prediction" and m.text_encoder.config.num_hidden_layers == 24
    res, ref, ref_lat = run_pair(comps, load_model(d / "model.safetensors"), PROMPTS[:1], 128, 128)
    print(f"SD 2.1 full, 128x128 txt2img: latents rel_error {rel_error(res.latents, ref_lat):.2e}, max pixel diff "
          f"{np.abs(pixels(res.images) - ref).max()}")
    assert np.abs(pixels(res.images) - ref).max() <= 1
    folder = load_model(d / "diffusers")
    assert folder.text_encoder.config.num_hidden_layers == 23 and folder.prediction_type == "v_prediction"
    for k, v in m.state_dict().items():
        if not k.startswith("cond_stage_model."):
            np.testing.assert_array_equal(folder.state_dict()[k], v, err_msg=k)
    fx.free_full("sd2")


@pytest.mark.slow
def test_sd15_full_txt2img_every_format(shared_dir):
    pytest.importorskip("diffusers")
    b = fx.full_build("sd1")
    comps, d = b["comps"], b["dir"]
    models = {f: load_model(d / f) for f in ("model.safetensors", "model.ckpt", "diffusers")}
    keys = _keys(shared_dir, "sd1")
    ref_state = models["model.safetensors"].state_dict()
    assert {k: tuple(v.shape) for k, v in ref_state.items()} == keys
    from safetensors.numpy import load_file
    assert fx.diffusers_reads_back(load_file(str(d / "model.safetensors")), comps) == \
        {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}
    for f in ("model.ckpt", "diffusers"):  # identical weights, so one pipeline run covers all three
        st = models[f].state_dict()
        assert set(st) == set(keys)
        for k in keys:
            np.testing.assert_array_equal(st[k], ref_state[k], err_msg=f"{f}: {k}")
    res, ref, ref_lat = run_pair(comps, models["model.safetensors"], PROMPTS[:1], 256, 256)
    px = np.abs(pixels(res.images) - ref).max()
    print(f"SD 1.5 full, 256x256 txt2img DDIM 3 steps: latents rel_error {rel_error(res.latents, ref_lat):.2e}, "
          f"max pixel diff {px}, image std {pixels(res.images).std() / 255:.3f}")
    assert px <= 1 and pixels(res.images).std() / 255 > 0.05


@pytest.mark.slow
def test_sd15_full_img2img():
    pytest.importorskip("diffusers")
    b = fx.full_build("sd1")
    res, ref = run_img2img_pair(b["comps"], load_model(b["dir"] / "model.safetensors"), 128, 128)
    print(f"SD 1.5 full, 128x128 img2img: max pixel diff {np.abs(pixels(res.images) - ref).max()}")
    assert np.abs(pixels(res.images) - ref).max() <= 1


@pytest.mark.slow
def test_sd15_full_fp16_folder():
    pytest.importorskip("diffusers")
    b = fx.full_build("sd1")
    m16 = load_model(b["dir"] / "diffusers_fp16")
    assert all(v.dtype == np.float16 for v in m16.state_dict().values())
    # rounds the cached components in place: the last user of them (test_verify.py needs only the files)
    res, ref, ref_lat = run_pair(fp16_rounded(b["comps"], inplace=True), m16, PROMPTS[:1], 128, 128)
    print(f"SD 1.5 full fp16 folder, 128x128: max pixel diff {np.abs(pixels(res.images) - ref).max()}")
    assert np.abs(pixels(res.images) - ref).max() <= 1
