"""Fixtures for the launcher tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from launchkit import make_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
