from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="byol-pytorch",
    version="1.2.0",
    description="BYOL self-supervised pretraining for any image backbone, as a drop-in PyTorch wrapper",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["byol_pytorch", "byol_pytorch.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=0.9",
        "einops>=0.6",
        "numpy>=1.22",
        "safetensors>=0.4",
        "pillow>=9.1",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "matplotlib>=3.5",
            "ruff>=0.6",
            "mypy>=1.10",
            "transformers>=4.40",
            "wandb>=0.16",
            "webdataset>=0.2",
            "datasets>=2.14",
            "tensorboard>=2.10",
            "fsspec>=2023.1",
            "aiohttp>=3.8",
            "s3fs>=2023.1",
            "moto[server]>=5",
            "gcsfs>=2023.1",
            "gcp-storage-emulator>=2022.6",
        ],
        "plots": ["matplotlib>=3.5"],
        "bench": ["kornia>=0.7", "matplotlib>=3.5", "psutil>=5.8", "lightly>=1.5"],
        "examples": ["lightning>=2.0", "accelerate>=0.25", "matplotlib>=3.5"],
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.16"],
        "shards": ["webdataset>=0.2"],
        "remote": ["webdataset>=0.2", "fsspec>=2023.1", "aiohttp>=3.8", "s3fs>=2023.1", "gcsfs>=2023.1"],
        "http": ["webdataset>=0.2", "fsspec>=2023.1", "aiohttp>=3.8"],
        "s3": ["webdataset>=0.2", "fsspec>=2023.1", "s3fs>=2023.1"],
        "gcs": ["webdataset>=0.2", "fsspec>=2023.1", "gcsfs>=2023.1"],
        "datasets": ["datasets>=2.14"],
    },
    entry_points={"console_scripts": ["byol-pytorch=byol_pytorch.app.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
