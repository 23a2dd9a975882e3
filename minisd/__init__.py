"""minisd: Stable Diffusion from scratch in NumPy, with hand-written backward passes.

See README.md for the tour and DEVELOPERS.md for the conventions every file follows.
"""
__version__ = "0.1.0"
