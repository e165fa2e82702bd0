import glob
import os
import shutil
from os import path

from setuptools import find_packages, setup

ROOT = path.dirname(path.abspath(__file__))


def get_model_zoo_configs():
    """
    The configs of `vfnet.model_zoo`, as Detectron2's setup.py gives its own: the repository's
    configs/ linked into the package as vfnet/model_zoo/configs (copied where links are not
    allowed) and listed as the package's data, so that an install, editable or not, holds them.
    The link is made again only when it is missing or points elsewhere.
    """
    source = path.join(ROOT, "configs")
    destination = path.join(ROOT, "projects", "VFNet", "vfnet", "model_zoo", "configs")
    link = path.relpath(source, path.dirname(destination))
    if path.isdir(source) and not (path.islink(destination) and os.readlink(destination) == link):
        if path.islink(destination):
            os.unlink(destination)
        elif path.isdir(destination):
            shutil.rmtree(destination)
        try:
            os.symlink(link, destination)
        except OSError:
            shutil.copytree(source, destination)
    found = glob.glob(path.join(source, "**", "*.yaml"), recursive=True)
    found += glob.glob(path.join(source, "**", "*.py"), recursive=True)
    return [path.relpath(p, ROOT) for p in found]


setup(
    name="vfnet",
    version="0.1.0",
    description="VarifocalNet (VFNet) for Detectron2",
    package_dir={"": "projects/VFNet"},
    packages=find_packages("projects/VFNet"),
    package_data={"vfnet.model_zoo": get_model_zoo_configs()},
    python_requires=">=3.9",
    # Detectron2 itself is a prerequisite built from its source (see README.md): it is on no
    # package registry.
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "numpy>=1.21",
        "Pillow>=9.0",
        "tqdm>=4.29",
        "opencv-python-headless>=4.5",
        "matplotlib>=3.5",
        "omegaconf>=2.1",  # LazyConfig (vfnet.engine.lazy); Detectron2 requires it too
    ],
    extras_require={
        # ONNX export: DeformConv (opset 19) runs in onnxruntime releases of 2026 and later.
        "export": ["onnx>=1.14", "onnxruntime>=1.17"],
        # Deploying on CPUs (vfnet.export.runtime): the export, OpenVINO, and NNCF for OpenVINO's
        # int8 (post-training quantization, dev/benchmark_export.py).
        "deploy": ["onnx>=1.14", "onnxruntime>=1.17", "openvino>=2024.0", "nncf>=2.10"],
        # The tests: scipy's distributions (the init tests), onnxscript (the dynamo exporter),
        # OpenVINO (the exported models' parity in it).
        "dev": [
            "pytest>=7.3",
            "hypothesis>=6.0",
            "scipy>=1.7",
            "onnx>=1.14",
            "onnxruntime>=1.17",
            "onnxscript>=0.1",
            "openvino>=2024.0",
        ],
    },
)
