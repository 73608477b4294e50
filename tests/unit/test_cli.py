"""The top-level CLI: override parsing and refusing bad input before any work starts."""

import json
import subprocess
import sys

import pytest

from moevit.cli import main


def test_overrides_after_flags_are_applied(capsys):
    assert main(["flops", "configs/demo.yaml", "--json", "model.moe.top_k=1", "model.depth=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    active_k1 = report["tasks"]["imagenet"]["params_active_per_token"]
    assert main(["flops", "configs/demo.yaml", "model.depth=2", "--json"]) == 0
    active_k2 = json.loads(capsys.readouterr().out)["tasks"]["imagenet"]["params_active_per_token"]
    assert active_k1 < active_k2


def test_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "configs/demo.yaml", "--frobnicate"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_demo_refuses_a_bad_config_before_writing_data(tmp_path, capsys):
    data = tmp_path / "synth"
    assert main(["demo", "--data", str(data), "model.moe.topk=1"]) == 2
    assert "unknown key 'model.moe.topk' (did you mean 'top_k'?)" in capsys.readouterr().err
    assert not data.exists()


def test_runs_demo_points_at_the_newest_demo_run(tmp_path):
    from moevit.cli import point_latest_demo_at

    link = tmp_path / "demo"
    for name in ("demo-1", "demo-2"):
        (tmp_path / name).mkdir()
        point_latest_demo_at(tmp_path / name, link)
        assert link.is_symlink() and link.resolve() == (tmp_path / name).resolve()
    link.unlink()
    link.mkdir()  # a real directory of that name is not replaced
    point_latest_demo_at(tmp_path / "demo-2", link)
    assert link.is_dir() and not link.is_symlink()


def test_the_cli_imports_no_deepspeed_until_a_command_needs_it():
    """DeepSpeed logs a warning on stdout when it is imported, which would corrupt `moevit flops --json`
    (and makes `moevit --help` slow): the parser must not import it."""
    probe = "import sys, moevit.cli; moevit.cli.build_parser(); print('deepspeed' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_models_lists_every_registered_variant_the_configs_name(capsys):
    from moevit.models import list_models

    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == list(list_models()) and {"moevit_tiny", "moevit_debug"} <= set(listed)
