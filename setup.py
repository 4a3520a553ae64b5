from setuptools import find_packages, setup

setup(
    name="nearl",
    version="0.1.0",
    description="NEARL-CLIP adapters for open_clip with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["nearl_kernels", "nearl_kernels.*", "nearl_model", "nearl_model.*"]),
    install_requires=[
        # The releases the kernels are proven to build on (nearl_kernels/_dispatch.py TRITON_RANGE; the
        # compile gate's tables per release are in benchmarks/results/compile_gate/): torch 2.8-2.15
        # pin triton 3.4-3.9.
        "torch>=2.8,<2.16",
        "torchvision",
        "triton>=3.4,<3.10; platform_system == 'Linux'",
        "open_clip_torch>=3.1",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pillow",
        "scikit-learn",
    ],
    extras_require={
        # transformers in dev too, so the BiomedCLIP and RoBERTa tower tests run rather than skip.
        "dev": ["pytest>=7", "pytest-benchmark>=4", "pydicom>=2.4", "transformers>=4.46", "open_clip_torch>=3.3"],
        "xformers": ["xformers"],
        "dicom": ["pydicom>=2.4"],
        # open_clip < 3.3 tokenizes with an API transformers 5 removed.
        "hf": ["transformers>=4.46", "open_clip_torch>=3.3"],
    },
    package_data={"nearl_model": ["model_configs/*.md", "model_configs/*/*.json", "model_configs/*/*/*.json"]},
)
