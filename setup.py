from setuptools import find_namespace_packages, setup

setup(
    name="pythia-jax",
    version="0.1.0",
    description="Pythia (GPT-NeoX) in JAX/Flax: exact Pythia data order, sharded training, "
                "Orbax checkpoints, HF/GPT-NeoX converters and evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # namespace packages: the data folders (assets/, task_specs/) are listed too, so setuptools does not
    # warn that they are "absent from the packages configuration" on every install
    packages=find_namespace_packages(include=["pythia_jax", "pythia_jax.*"]),
    package_data={"pythia_jax": ["assets/*", "assets/**/*", "eval/task_specs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorstore>=0.1.70",
        "grain>=0.2.10",
        "gin-config>=0.5",
        "numpy>=1.26",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "pyyaml>=6.0",
        "zstandard>=0.22",
        "matplotlib>=3.7",
    ],
    extras_require={
        "convert": ["torch==2.13.0", "transformers>=4.40"],
        "test": ["torch==2.13.0", "transformers>=4.40", "pytest>=8", "pytest-xdist>=3", "ruff==0.17.6",
                 "lm-eval>=0.4", "accelerate>=0.26"],
        "seqio": ["seqio>=0.0.19"],
        "lm_eval": ["lm-eval>=0.4", "accelerate>=0.26"],
        "gcs": ["gcsfs"],
    },
    entry_points={"console_scripts": ["pythia-jax=pythia_jax.cli:entry"]},
)
