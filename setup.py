"""Install vaegan_fast.

The Triton source lives in the top-level ``kernels/`` folder (device code, kept apart from the library as
the design asks), but it is installed *inside* the package as ``vaegan_fast.kernels`` through
``package_dir``. That keeps a generic top-level module called ``kernels`` (a published PyPI package
already has that name) out of site-packages. Editable installs map it the same way.

torch is declared as ``torch>=2.4`` and not pinned: a GPU user keeps the torch they have. On a CPU-only
machine install the CPU build first (``pip install torch==2.13.0``), as the README's set-up command does,
so that pip sees the requirement satisfied and never pulls a multi-GB CUDA build.
"""
from setuptools import setup

setup(
    name="vaegan_fast",
    version="0.1.0",
    description="A performance engine for training VAE-GANs in PyTorch, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vaegan_fast", "vaegan_fast.ops", "vaegan_fast.nn", "vaegan_fast.kernels"],
    package_dir={"vaegan_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy",
        "nvidia-ml-py",
        "pillow",  # PNG sample grids and image-folder datasets
        "tqdm",  # the training CLI's progress bar
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["vaegan-fast=vaegan_fast.__main__:main"]},
)
