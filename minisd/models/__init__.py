"""The three networks of Stable Diffusion, each with a hand-written backward pass.

    unet.py   UNetConfig (SD15, SD21, SD21_768V, tiny presets) and UNet: the eps/v-predicting denoiser
    vae.py    VAEConfig and VAE (AutoencoderKL): encoder, diagonal-Gaussian posterior, decoder, tiled decode
    clip.py   CLIPTextConfig and CLIPTextModel: SD 1.x (ViT-L/14 text) and SD 2.x (OpenCLIP ViT-H text) encoders
    common.py named-parameter wrappers around the ops (conv, linear, norms) that block code is written with

Parameter names are the original single-file checkpoint keys, so an SD checkpoint loads with no renaming.
"""
