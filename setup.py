from setuptools import find_packages, setup

setup(
    name="vfnet",
    version="0.1.0",
    description="VarifocalNet (VFNet) for Detectron2",
    package_dir={"": "projects/VFNet"},
    packages=find_packages("projects/VFNet"),
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
        # The tests: scipy's distributions (the init tests), onnxscript (the dynamo exporter).
        "dev": [
            "pytest>=7",
            "hypothesis>=6.0",
            "scipy>=1.7",
            "onnx>=1.14",
            "onnxruntime>=1.17",
            "onnxscript>=0.1",
        ],
    },
)
