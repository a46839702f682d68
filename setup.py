"""jaxrec: a JAX/Flax model zoo for very deep sequential recommenders."""
from setuptools import find_packages, setup

setup(
    name="jaxrec",
    version="0.2.0",
    description="NextItNet-style very deep sequential recommenders in JAX/Flax: "
    "stacking, compression, transfer and skipping.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxrec", "jaxrec.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4",
        "chex>=0.1.92",
        "numpy",
        "pyarrow",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tensorboard": ["tensorboardX"],
        "serving": ["flatbuffers"],
        "notebook": ["treescope", "ipykernel"],
        # tensorflow-datasets: the tfds: source is tested through
        # tfds.testing.mock_data, not only its missing-package error.
        "test": ["pytest", "pytest-xdist", "tensorboardX", "flatbuffers",
                 "treescope", "nbclient", "nbformat", "ipykernel",
                 "tensorflow-datasets", "tensorflow-cpu"],
    },
    entry_points={
        "console_scripts": ["jaxrec=jaxrec.cli:main"],
        # What fills the registries (jaxrec.config.load_plugins); an outside
        # package adds a backbone, head or method by declaring its own.
        "jaxrec.plugins": ["models = jaxrec.models", "heads = jaxrec.heads",
                           "methods = jaxrec.methods"],
    },
)
