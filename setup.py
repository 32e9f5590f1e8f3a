"""daal-triton: the DAAL metric-learning loss with fused Triton kernels.

``kernels/`` and ``reference/`` live at the top of the repository but install *inside* the
package, as ``daal_triton.kernels`` and ``daal_triton.reference``: no top-level ``kernels`` or
``reference`` module is ever importable from an install.
"""
from setuptools import setup

PACKAGE_DIR = {
    "daal_triton": "daal_triton",
    "daal_triton.kernels": "kernels",
    "daal_triton.reference": "reference",
    "daal_triton.train": "daal_triton/train",
    "daal_triton.train.data": "daal_triton/train/data",
}

setup(
    name="daal-triton",
    version="0.1.0",
    description="DAAL (Density-Aware Adaptive Line margin) loss for deep metric learning, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir=PACKAGE_DIR,
    packages=list(PACKAGE_DIR),
    package_data={"daal_triton": ["py.typed"]},  # PEP 561: type checkers read the package's own hints
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # wheel: test_install builds one; mypy (pinned: a release that checks more would fail the suite;
        # Python >= 3.10): test_typing reads the types users' checkers see
        "dev": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "wheel",
                "mypy==2.4.1; python_version >= '3.10'"],
        "train": ["torchvision>=0.19", "scikit-learn>=1.2", "tqdm>=4.60", "matplotlib>=3.5"],
        "pml": ["pytorch-metric-learning>=2.0", "faiss-cpu"],
    },
    entry_points={
        "console_scripts": [
            "daal-train=daal_triton.train.console:train",
            "daal-eval=daal_triton.train.console:evaluate",
            "daal-study=daal_triton.train.console:study",
        ]
    },
)
