"""Shared helpers of the deployment tests: where things are, and the external tools they need.

The tools come from Debian (`prometheus`/`promtool`, `docker-compose`, `kubectl`; `.ci/run`
installs them; `openssl`, for deploy/secrets/generate.sh) or from the dev dependency group
(`hadolint`, `kubernetes-validate`). A missing Debian tool skips its tests with the reason,
except in CI (`CI` set to true), where it fails them: CI installs every one of them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: The virtual environment's scripts (`vlm`, `hadolint`, `kubernetes-validate`).
VENV_BIN = Path(sys.executable).parent

_DEBIAN_PACKAGE = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "docker-compose": "docker-compose",
    "kubectl": "kubectl",
    "openssl": "openssl",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of executable `name`: from the venv first, then PATH. Missing: skip the test
    (fail it in CI) with the package that provides it."""
    venv = VENV_BIN / name
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which(name)
    if found:
        return found
    package = _DEBIAN_PACKAGE.get(name)
    how = f"apt-get install -y {package}" if package else "uv sync (dev group)"
    message = f"{name} not found (install: {how}; .ci/run does)"
    if in_ci():
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip")
    pytest.skip(message)
