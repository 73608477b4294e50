"""Fixtures of the fault-injection suite: the multi-process launcher of tests/distributed, tiny data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from moevit.data.synth import write_synthetic_datasets

sys.path.insert(0, str(Path(__file__).parent))  # test files import fault_helpers
_spec = importlib.util.spec_from_file_location(
    "distributed_conftest", Path(__file__).parents[1] / "distributed" / "conftest.py"
)
_distributed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_distributed)
run_workers = _distributed.run_workers  # the fixture, re-exported


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_datasets(root, size="tiny")
    return root
