from setuptools import find_packages, setup

setup(
    name="terarec",
    version="0.1.0",
    description=("CTR training with terabyte embedding tables: hierarchical PS, "
                 "topology-aware routing, k-step merging"),
    packages=find_packages(include=["terarec", "terarec.*"]),
    python_requires=">=3.10",
    # torch, torchrec and fbgemm-gpu(-cpu) are installed by scripts/install.sh with the
    # right build for the machine (CPU wheel here, CUDA wheel on GPU hosts); torchrec
    # names the CUDA fbgemm-gpu, so it is installed with --no-deps.
    install_requires=[
        "numpy",
        "pyarrow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "torchmetrics==1.0.3",
        "tensordict",
        "pyre-extensions",
        "rocksdict",
        "xxhash",
        "safetensors",
        "fastapi",
        "orjson",
        "uvicorn",
        "httptools",
        "uvloop",
        "httpx",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "dev": ["pytest", "hypothesis", "ruff"],
        "test": ["pytest", "hypothesis"],
    },
    entry_points={
        "console_scripts": [
            "terarec=terarec.cli:main",
            "terarec-launch=terarec.launch.cli:main",
            "terarec-topo=terarec.topology.cli:main",
        ]
    },
)
