"""`moevit submit --dry-run`: the rendered batch script, profiles, and refusals before anything is submitted."""

from __future__ import annotations

import pytest
import yaml

from moevit.cli import main
from moevit.slurm.sbatch import DEFAULT_TEMPLATE, JobLayout, load_profile, render_sbatch


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {"format": "imagenet", "root": str(tmp_path), "image_size": 32, "batch_size": 2}
    config = {
        "model": {"name": "moevit_debug"},
        "tasks": {"a": {"type": "classification", "num_classes": 3, "data": data}},
        "parallel": {"ep_size": 2},
        "output_dir": "runs/x",
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dry_run(capsys, *args: str) -> str:
    assert main(["submit", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_gpu_job_one_process_per_gpu_with_preemption_and_requeue(config_file, capsys, tmp_path):
    script = dry_run(capsys, str(config_file), "--nodes", "4", "--gpus-per-node", "8", "--partition", "p1",
                     "--account", "acc", "--time", "02:00:00", "train.steps=7")  # fmt: skip
    options = sbatch_lines(script)
    for expected in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=p1", "--account=acc",
                     "--time=02:00:00", "--signal=USR2@120", "--requeue", "--job-name=moevit-x",
                     f"--output={tmp_path}/runs/x/slurm-%j.out", f"--chdir={tmp_path}"]:  # fmt: skip
        assert expected in options, (expected, options)
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 {__import__('sys').executable} -m moevit.cli train "
                    f"{config_file} --resume auto train.steps=7"]  # fmt: skip
    assert "{{" not in script


def test_cpu_mode_runs_gloo_tasks_without_gpus(config_file, capsys):
    script = dry_run(capsys, str(config_file), "--cpu", "--tasks-per-node", "2")
    options = sbatch_lines(script)
    assert "--ntasks-per-node=2" in options and not any("gpu" in option for option in options)
    assert script.rstrip().endswith("--resume auto parallel.backend=gloo")


def test_profile_fills_in_and_flags_win(config_file, capsys):
    script = dry_run(capsys, str(config_file), "--profile", "example", "--partition", "debug")
    options = sbatch_lines(script)
    assert {"--partition=debug", "--account=my-project", "--gpus-per-node=4", "--ntasks-per-node=4",
            "--cpus-per-task=8", "--exclusive", "--time=1-00:00:00"} <= set(options)  # fmt: skip
    assert "module load cuda/12.4" in script.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --gpus-per-node G"),
        (["--cpu", "--gpus-per-node", "2"], "exclude each other"),
        (["--profile", "nonesuch"], "--profile nonesuch: no such file"),
        (["--nodes", "0", "--gpus-per-node", "1"], "need --nodes >= 1"),
    ],
)
def test_bad_layouts_are_refused(config_file, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["submit", str(config_file), *args, "--dry-run"])


def test_config_is_checked_for_the_job_world_size(config_file, capsys):
    # ep_size 2 does not divide 3 processes: refused on the submitting machine, not after the queue.
    assert main(["submit", str(config_file), "--cpu", "--tasks-per-node", "3", "--dry-run"]) == 2
    assert "parallel.ep_size=2 does not divide the world size 3" in capsys.readouterr().err


def test_a_run_dir_with_checkpoints_needs_resume(config_file, capsys, tmp_path):
    (tmp_path / "runs/x/checkpoints/step_00000001").mkdir(parents=True)
    cpu = ["--cpu", "--tasks-per-node", "2"]
    assert main(["submit", str(config_file), *cpu, "--dry-run"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert "--resume auto" in dry_run(capsys, str(config_file), *cpu, "--resume", "auto")


def test_template_and_values_must_match():
    layout, profile = JobLayout(1, 1, 0), load_profile(None)
    with pytest.raises(ValueError, match=r"missing \['train_command'\], unknown \['typo'\]"):
        template = DEFAULT_TEMPLATE.read_text().replace("{{train_command}}", "{{typo}}")
        render_sbatch(template, layout, profile, "cmd", "job", DEFAULT_TEMPLATE.parent, DEFAULT_TEMPLATE)


def test_unknown_profile_keys_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("partiton: gpu\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['partiton'\]"):
        load_profile(str(path))


def test_model_init_is_checked_on_the_submitting_machine(config_file, capsys, tmp_path):
    cpu = ["--cpu", "--tasks-per-node", "2"]
    bad = "model.init=weights/missing.pth"
    assert main(["submit", str(config_file), *cpu, bad, "--dry-run"]) == 2
    assert "model.init weights/missing.pth: no such file or directory" in capsys.readouterr().err
