"""Build script for minillm.

The pure-Python package always installs. The compiled extensions (the C++ CPU twin ``minillm._C``
and the CUDA kernels ``minillm._cuda``) are optional: see the extension section below.
"""
from setuptools import setup

setup()
