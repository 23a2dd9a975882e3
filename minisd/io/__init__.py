"""Checkpoint file I/O. `minisd.io.safetensors`: the .safetensors reader (memory-mapped) and atomic writer.

Foreign formats (torch .ckpt/.pt/.bin pickles, diffusers folders) are read by the separate `weights_convert`
package, which never runs pickled code.
"""
from .safetensors import SafetensorsError, SafetensorsFile, load, save

__all__ = ["SafetensorsError", "SafetensorsFile", "load", "save"]
