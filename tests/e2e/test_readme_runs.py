"""Every `moevit` command of the README, run in the order written on a fresh directory, as a new user
would after the quick start (issue 18). Slow: 15 min 36 s on the 2 cores (2026-12-07, with other tests
running), since the demo, two fine-tunings and a continual run train for real; so it is opt-in,
`pytest -m readme`. The suite's tests/unit/test_readme_commands.py checks the same commands parse and
read only runs written above them.

Nothing is exempted: the README's SLURM commands carry `--dry-run`, and nothing in it needs a GPU.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.readme, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 1800


def readme_commands() -> list[list[str]]:
    """The quick start's `moevit demo`, then every `moevit ...` line of the README's bash blocks."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_readme_commands import moevit_commands

    return [["demo"], *moevit_commands((ROOT / "README.md").read_text())]


@pytest.mark.timeout(4 * 3600)
def test_readme_commands_run_in_order(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the README's relative paths, on a fresh tree
    for argv in readme_commands():
        done = subprocess.run(
            [sys.executable, "-m", "moevit.cli", *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == 0, (
            f"`moevit {shlex.join(argv)}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
