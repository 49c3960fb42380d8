"""The conventional setup.py of detectron2 projects works and reads its metadata from pyproject.toml."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_reads_the_project_metadata():
    out = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-2:] == ["algm_d2", "0.1.0"]
