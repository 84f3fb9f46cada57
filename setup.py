"""fastdino: fast DINO pretraining for vision transformers.

The repository keeps its three code folders at the top level (engine/, kernels/, pipelines/); installed, they
live under one `fastdino` namespace so that no top-level `kernels` package shadows the PyPI one.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "fastdino" / "__init__.py").read_text()).group(1)

setup(
    name="fastdino",
    version=VERSION,
    description="Fast DINO self-supervised pretraining: fused Triton kernels, DALI multi-crop, FSDP2",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={
        "fastdino": "fastdino",
        "fastdino.engine": "engine",
        "fastdino.kernels": "kernels",
        "fastdino.pipelines": "pipelines",
    },
    packages=["fastdino", "fastdino.engine", "fastdino.kernels", "fastdino.pipelines"],
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "triton; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy",
        "pillow",
        "safetensors",
        "pyyaml",
        "matplotlib",  # fastdino plot
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "tensorboard": ["tensorboard"],  # event files in DIR/tb (logging.tensorboard=auto turns them on)
        "test": ["pytest", "pytest-timeout", "setuptools>=64", "nvidia-dali-cuda130", "tensorboard"],
    },
    entry_points={"console_scripts": ["fastdino = fastdino.engine.cli:main"]},
)
