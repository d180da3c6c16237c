"""Package metadata for ccfs-fast (engine, dataset converter and benchmarks)."""
from setuptools import find_packages, setup

setup(
    name="ccfs-fast",
    version="0.1.0",
    description="Curriculum Coarse-to-Fine Selection (CCFS, CVPR 2025) on FFCV loaders and numba kernels",
    python_requires=">=3.10",
    license="Apache-2.0",
    packages=find_packages(include=["ccfs_fast", "ccfs_fast.*", "beton_builder", "beton_builder.*",
                                    "benchmarks", "benchmarks.*"]),
    install_requires=[
        "torch>=2.5,<2.15",  # CUDAGraph.register_generator_state, fused SGD with a tensor lr
        "torchvision>=0.20,<0.30",
        "ffcv==1.0.2",
        "numpy>=1.24,<3",
        "numba>=0.58,<0.70",
        "pandas>=2.0,<4",
        "tqdm>=4.60",
        "pillow>=9",
        "matplotlib>=3.7",
        "psutil>=5.9",
        "scikit-learn>=1.3",  # the demo's real data (handwritten digits) and its k-means stand-in
        "scipy>=1.10",  # the ImageNet devkit's meta.mat
        "pyarrow>=14",  # build parquet: Hugging Face Hub shards
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff>=0.4", "hypothesis>=6.80", "tensorboard>=2.14", "import-linter>=2.13"],
        "tb": ["tensorboard>=2.14"],  # --tensorboard: per-epoch curves as TensorBoard event files
    },
    entry_points={"console_scripts": ["ccfs-fast=ccfs_fast.cli:entry"]},
)
