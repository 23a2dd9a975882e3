"""Readers for foreign checkpoint formats, kept apart from the minisd runtime.

`weights_convert.torch_zip.load_torch_file` reads torch.save files (.ckpt/.pt/.pth/.bin, zip and legacy formats)
with an allow-listed unpickler that never imports or calls anything from the file. No torch needed.
"""
from .torch_zip import TorchFileError, UnsafeCheckpointError, load_torch_file

__all__ = ["TorchFileError", "UnsafeCheckpointError", "load_torch_file"]
