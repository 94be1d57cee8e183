"""neuralreg: pairwise medical image registration with neural fields and GradICON.

No torch import here: pip may build in an isolated environment, and torch there would
pull the newest CUDA build. Native kernels build on first use (see neuralreg/fields/native.py).
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="neuralreg",
    version="0.1.0",
    description="Register a pair of 2D/3D medical images by optimizing neural fields with GradICON",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # cuda_kernels/ (the kernel sources, compiled on first use) ships as neuralreg._kernels
    packages=find_packages(include=["neuralreg", "neuralreg.*"]) + ["neuralreg._kernels"],
    package_dir={"neuralreg._kernels": "cuda_kernels"},
    package_data={"neuralreg._kernels": ["*.h", "*.cpp", "*.cu", "*.sh"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "nibabel>=5.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # figures; also brings Pillow for PNG/JPEG input
        "ninja",  # torch.utils.cpp_extension builds the native kernels with it on first use
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "SimpleITK>=2.2",
            "ruff>=0.5",
            "dask[distributed]>=2024.1",
            "antspyx>=0.5",
            "itk-elastix>=0.20",
            "scipy>=1.9",  # neuralreg-eval's, for its tests (pip install -e ./eval)
        ],
        # the evaluation code (knee protocol, baselines, benchmark harness) is its own
        # distribution, eval/ (neuralreg-eval): pip install -e "./eval[baselines]"
        # cohort registration (neuralreg batch)
        "batch": ["dask[distributed]>=2024.1"],
        # no extra for tinycudann (installed by hand on a CUDA machine, docs/kernels.md) nor for
        # icon-registration (it pins torchvision, which has no CPU build here: --no-deps)
    },
    entry_points={"console_scripts": ["neuralreg=neuralreg.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Medical Science Apps."],
)
