"""Shared fixtures. The digits teacher is trained once per test session (about 60 s on 2 AVX2 CPU cores)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """Path to a real digits teacher (WRN-16-2, 16x16) made by train_teacher.py with its default recipe."""
    import train_teacher
    path = str(tmp_path_factory.mktemp("teacher") / "digits_wrn16_2.pt")
    meta = train_teacher.main(["--out", path])
    assert meta["test_acc"] >= 97.0, meta
    return path
