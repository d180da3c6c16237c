"""ccfs-fast: Curriculum Coarse-to-Fine Selection on FFCV loaders and numba kernels."""

__version__ = "0.1.0"
