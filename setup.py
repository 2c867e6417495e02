from setuptools import setup

setup(
    name="qwen-fused",
    version="0.1.0",
    description="Merged-QKV Qwen-Image transformer with fused Triton kernels, same results as diffusers",
    python_requires=">=3.10",
    packages=["qwen_fused", "qwen_fused.lora", "qwen_fused.families", "qwen_fused.kernels", "qwen_fused.bench"],
    package_dir={"qwen_fused": "qwen_fused", "qwen_fused.kernels": "kernels", "qwen_fused.bench": "bench"},
    package_data={"qwen_fused": ["fsdp_config.yaml", "scripts/*.sh"],
                  "qwen_fused.bench": ["results/*.json", "results/*.md"],
                  "qwen_fused.kernels": ["tuning/*.json"]},
    install_requires=[
        "torch>=2.6",
        "diffusers>=0.36",
        "peft>=0.17",
        "transformers>=4.51",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton"],  # no version: see "test"
        "bench": ["matplotlib"],
        "train": ["tensorboard"],
        # everything `python -m pytest tests` needs (the README installs this extra only), with diffusers and
        # peft at the versions the suite is verified against: its tests compare with their exact behaviour.
        # triton without a version: a CUDA torch pins the triton it was built with (torch 2.6: triton==3.2.0),
        # and any other requirement on it makes pip replace the user's torch by another build to satisfy both;
        # a CPU torch brings none, and then this installs the newest (the kernel tests run under its interpreter)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton", "matplotlib", "tensorboard",
                 "diffusers==0.42.1", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["qwen-fused=qwen_fused.cli:main"]},
)
