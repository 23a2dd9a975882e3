"""Training: the whole Stable Diffusion recipe at MNIST/CIFAR scale, with minisd's own backward passes.

    recipes.py      named presets (mnist_ddpm, mnist_vae, mnist_clip, mnist_ldm, cifar_ddpm, ...) and JSON recipe files
    data.py         the training images: load, pad (MNIST 28 -> 32 for the VAE), grey -> RGB, augmentation
    trainer.py      the loop: AdamW, warmup + cosine LR, gradient clipping, EMA, tqdm, JSONL log, sample grids,
                    loss curve, atomic checkpoints (every N steps and on Ctrl-C), keep-last-K, exact --resume,
                    stop on NaN keeping the last good checkpoint
    checkpoints.py  checkpoint and exported-model files (safetensors + JSON metadata) and how to read them back
    classifier.py   a small ConvNet (classifier for evaluation, CLIP image tower) and its training task
    diffusion.py    pixel-space DDPM task (MNIST / CIFAR, class-conditional with label dropout for CFG) and the
                    text-conditioned latent diffusion task (frozen VAE + frozen tiny CLIP text encoder)
    autoencoder.py  AutoencoderKL task (reconstruction + KL)
    clip.py         tiny CLIP task: image ConvNet + minisd's CLIP text transformer, contrastive loss, captions
    metrics.py      classifier accuracy, Frechet distance in the classifier's feature space, CLIP score
    plots.py        loss curve and image grids as PNG, drawn with Pillow only

The order of the SD recipe (docs/training.md has the commands and measured figures):
    minisd train --recipe mnist_classifier     # the evaluation classifier
    minisd train --recipe mnist_vae            # autoencoder, 32x32 -> 8x8x4 latents
    minisd train --recipe mnist_clip           # tiny CLIP (image ConvNet + text transformer)
    minisd train --recipe mnist_ldm            # latent U-Net cross-attending to the frozen text encoder
"""
