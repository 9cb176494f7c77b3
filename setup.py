"""distiller-dcq: Divide and Conquer Quantization for Intel's Neural Network Distiller."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "distiller_dcq.pth"  # imports distiller_dcq at interpreter start: see README, "How Distiller finds DCQ"


class BuildPyWithPth(build_py):
    """Ship ``distiller_dcq.pth`` at the top of site-packages (wheel and editable installs)."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(
    name="distiller-dcq",
    version="0.1.0",
    description="Divide and Conquer Quantization (DCQ) for Intel's Neural Network Distiller",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # the top-level schedules/ ships as distiller_dcq/schedules (distiller_dcq.report.schedules.schedules_dir)
    packages=find_packages(include=["distiller_dcq", "distiller_dcq.*"]) + ["distiller_dcq.schedules"],
    package_dir={"distiller_dcq.schedules": "schedules"},
    package_data={"distiller_dcq.schedules": ["*.yaml"]},
    python_requires=">=3.8",
    install_requires=["torch>=2.6", "numpy", "pyyaml"],  # 2.6: safe_globals takes (reference, name) pairs
    extras_require={"test": ["pytest", "torchvision", "scipy", "matplotlib"], "svhn": ["scipy"],
                    "report": ["matplotlib"], "export": ["onnx", "onnxruntime"]},
    cmdclass={"build_py": BuildPyWithPth},
)
