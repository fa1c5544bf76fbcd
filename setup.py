"""moejax: Mixture-of-Experts Transformers with stable routing, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description=("Mixture-of-Experts Transformers with stable routing "
                 "(StableMoE, EvoMoE) in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moejax", "moejax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "sentencepiece>=0.2",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array-record>=0.8",
        "etils[epath]",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "tqdm",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "absl-py",
        "sacrebleu>=2.4",
    ],
    extras_require={
        "dev": ["pytest>=8", "scipy>=1.11", "pytest-xdist>=3.5", "nbclient>=0.10",
                "nbformat>=5.9", "ipykernel>=6.29"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": [
        "moejax-train=moejax.cli:main",
        "moejax-sample=moejax.cli_sample:main",
        "moejax-eval=moejax.cli_eval:main",
        "moejax-finetune=moejax.cli_finetune:main",
        "moejax-translate=moejax.cli_translate:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "License :: OSI Approved :: Apache Software License",
    ],
)
