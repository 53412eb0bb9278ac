"""Build script: the Python packages, plus the CUDA extension lego_kernels._C (added by csrc/CMakeLists.txt)."""

from setuptools import setup

setup()
