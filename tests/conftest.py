"""Shared test configuration.

* Each test file ``tests/test_NN_<chapter>.py`` gets the marker ``chNN`` automatically, so
  ``pytest -m ch05`` (``make test-ch05``) runs one chapter.
* ``crosscheck`` tests need the crosscheck extra (torch, transformers, peft, trl, bitsandbytes).
  Where it is missing they skip, except when ``MINILLM_REQUIRE_CROSSCHECK=1`` (set by .ci/run):
  then a missing package is an error, so a skipped cross-check can never pass for a green CI.
* ``cuda`` tests skip cleanly unless cupy and a GPU are present.
"""
from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest

_CHAPTER_FILE = re.compile(r"test_(\d\d)_")


def pytest_collection_modifyitems(config, items):
    for item in items:
        m = _CHAPTER_FILE.match(item.path.name)
        if m:
            item.add_marker(getattr(pytest.mark, f"ch{m.group(1)}"))


def require(module: str):
    """Import a crosscheck dependency, or skip (or fail under MINILLM_REQUIRE_CROSSCHECK=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        if os.environ.get("MINILLM_REQUIRE_CROSSCHECK") == "1":
            raise RuntimeError(f"crosscheck dependency {module!r} is required in CI but missing: {e}")
        pytest.skip(f"{module} not installed (pip install -e '.[crosscheck]')")


@pytest.fixture
def torch():
    t = require("torch")
    t.manual_seed(0)
    t.set_num_threads(min(2, os.cpu_count() or 1))
    return t


def _has_gpu() -> bool:
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not HAS_GPU:
        pytest.skip("no NVIDIA GPU / cupy on this machine")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
