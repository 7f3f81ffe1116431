"""tests/skip_guard.py: a run with a skip other than the gpu marker's fails and names the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = """
import pytest

def test_runs():
    assert True

@pytest.mark.gpu
@pytest.mark.skip(reason="needs a CUDA GPU")
def test_gpu_only():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_known_failure():
    assert False
"""
SELF_SKIPPING = """
import pytest

@pytest.mark.skipif(True, reason="a commit is not in the last 50")
def test_switched_off():
    pass
"""


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(body)
    command = [sys.executable, "-m", "pytest", "-p", "tests.skip_guard", "-q", "-rs", "-o", "markers=gpu: x", str(tmp_path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("skips", ["none but gpu", "switched off"])
def test_only_gpu_skips_pass_the_run(tmp_path, skips):
    run = _run(tmp_path, TESTS if skips == "none but gpu" else TESTS + SELF_SKIPPING)
    if skips == "none but gpu":
        assert run.returncode == 0, run.stdout
        assert "1 passed, 1 skipped, 1 xfailed" in run.stdout
    else:
        assert run.returncode == 1, run.stdout
        assert "test_sample.py::test_switched_off: a commit is not in the last 50\n" in run.stdout
