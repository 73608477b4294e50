"""The `slurm_cluster` fixture: one real one-node SLURM cluster (tests/slurm/cluster.py) per session.

Tests using it skip, saying why, only where the cluster cannot exist at all (not root, or SLURM missing
and no apt-get); CI runs as root on Debian and must run them. The daemons are stopped by pid when the
session ends, whether the tests passed or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Lets test files (imported with --import-mode=importlib) import cluster.py.
sys.path.insert(0, str(Path(__file__).parent))

from cluster import ClusterUnavailable, OneNodeCluster  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    try:
        cluster = OneNodeCluster.start(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
