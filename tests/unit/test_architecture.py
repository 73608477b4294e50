"""The package's layers only point down: the import-linter contract in pyproject.toml holds, and it would
catch a lower layer importing a higher one."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the `moevit` package found in `project` with `project`'s pyproject contract."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(project / "pyproject.toml"), "--no-cache"],
        cwd=project,
        env={"PYTHONPATH": str(project), "PATH": str(LINT_IMPORTS.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layers_only_point_down():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "moevit", tmp_path / "moevit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "moevit" / "models" / "registry.py", "a") as module:
        module.write("\nfrom moevit.train import loop  # noqa: E402  (a layer reaching up)\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "moevit.models is not allowed to import moevit.train" in done.stdout
