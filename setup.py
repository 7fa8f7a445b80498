"""Install the recipe plugin for verl 0.9.1.

CPU machines: install torch's CPU wheel first (``pip install torch==2.13.0``); a bare
torch requirement resolves to the CUDA build and pulls several GB. ``run.sh`` and
``.ci/run`` do this in order. GPU machines: ``pip install -e .[gpu]`` adds vLLM at the
version verl 0.9.1 pins (``verl[vllm]``: vllm 0.24.0, torch 2.11.0).
"""

from setuptools import find_packages, setup

setup(
    name="verl-recipe-sample-efficient",
    version="0.1.0",
    description="Sample-efficient RL recipes (RAFT++, Reinforce-Rej, GRPO, LoRR, DOTS, replay) as a verl plugin",
    packages=find_packages(include=["recipe", "recipe.*", "verl_patches", "verl_patches.*"]),
    # Spelled out on purpose: with package_dir {"": "."}, setuptools' default editable
    # install (`pip install -e .`, PEP 660, no --config-settings) writes a static .pth
    # holding the checkout root, a plain sys.path entry. Without it this flat layout gets
    # setuptools' import finder instead, appended to sys.meta_path after PathFinder, which
    # never sees `import recipe`: PathFinder already returns the `recipe/` namespace folder
    # that TransferQueue installs into site-packages (from any cwd but the repo root).
    # With a path entry, the regular package wins wherever it sits on sys.path, since
    # namespace portions are used only when no entry holds a regular package or module.
    # tests/install/test_install.py checks this in a fresh venv.
    package_dir={"": "."},
    package_data={"": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "verl==0.9.1",
        "torch>=2.6",
        # what verl's trainer (main_ppo, V1 trainer) needs that `pip install verl` misses
        "cachetools",
        "fastapi",
        "uvicorn",
        "pyzmq",
        "msgspec",
        "TransferQueue==0.1.11",
        "hydra-core>=1.3",
        # Slurm sweeps: python -m recipe.main -m hydra/launcher=slurm_cpu|slurm_gpu|slurm_multinode
        "hydra-submitit-launcher>=1.2",
        "submitit>=1.5",
        "ray[default]>=2.41",
        "transformers>=5.5.3,<5.11",
        "tokenizers",
        "sympy",
        # audited against hostile answers in this version (docs: GRADING_SECURITY)
        "math-verify==0.9.0",
        "pebble>=5.0",
        "pandas",
        "pyarrow>=19",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["verl[vllm]==0.9.1"],
        "test": ["pytest>=8"],
    },
    entry_points={
        # verl imports every entry point of this group in every process that imports verl
        "verl.plugins": ["recipe_verl_patches = verl_patches.plugin"],
    },
)
