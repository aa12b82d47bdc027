"""mmpretrain: distributed image-text-audio pretraining (contrastive + captioning) under DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="mmpretrain",
    version="0.1.0",
    description="Distributed multimodal (image/audio/text) contrastive + generative pretraining under DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmpretrain", "mmpretrain.*"]),
    python_requires=">=3.9",
    # no upper pins: clusters bring their own torch/CUDA stack
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "accelerate>=0.30",
        "transformers>=4.40",  # pretrained towers from local HF directories; HF-loadable exports
        "webdataset>=0.2.86",
        "tokenizers>=0.15",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "pillow>=10",
        "numpy>=1.24",
        "scipy>=1.10",
        "soxr>=0.3",  # audio resampling (data.decode.resample; scipy is the fallback)
        "tqdm>=4.60",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "triton>=3.0"],
        "wandb": ["wandb>=0.16"],
        "tensorboard": ["tensorboard>=2.10"],  # log.report_to: [tensorboard]
        "plot": ["matplotlib>=3.7"],  # mmpretrain-plot
        "eval": ["scikit-learn>=1.3", "sacrebleu>=2.3", "pycocoevalcap>=1.2"],
        "dev": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3", "triton>=3.0", "scikit-learn>=1.3", "sacrebleu>=2.3", "pycocoevalcap>=1.2", "pyflakes>=3",
                "tensorboard>=2.10", "matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "mmpretrain-train=mmpretrain.train:main",
            "mmpretrain-submit=mmpretrain.submit:main",
            "mmpretrain-evaluate=mmpretrain.evaluate:main",
            "mmpretrain-export=mmpretrain.export:main",
            "mmpretrain-plan=mmpretrain.plan:main",
            "mmpretrain-plot=mmpretrain.plot:main",
            # the user-facing tools (tools/*.py are wrappers of these)
            "mmpretrain-make-shards=mmpretrain.cli.make_shards:main",
            "mmpretrain-inspect-shards=mmpretrain.cli.inspect_shards:main",
            "mmpretrain-train-tokenizer=mmpretrain.cli.train_tokenizer:main",
            "mmpretrain-make-demo-data=mmpretrain.cli.make_demo_data:main",
            "mmpretrain-caption=mmpretrain.cli.caption:main",
        ]
    },
)
