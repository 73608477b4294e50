"""The README's commands, checked without running them: each parses with the real CLI parser, and
each run it reads was written by a command above it (or by `moevit demo`), so they work in the order
written. (Running them all takes longer than the whole suite; the e2e tests run each command kind.)"""

import shlex
from pathlib import Path

import pytest
import yaml

from moevit.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/moevit demo",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/pytest -q',
)


def bash_blocks(text: str) -> list[str]:
    blocks, inside = [], None
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside = []
        elif line.strip() == "```" and inside is not None:
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def moevit_commands(text: str) -> list[list[str]]:
    """Every `moevit ...` line of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["moevit"]:
                commands.append(words[1:])
    return commands


def run_of(path: str) -> str:
    """`runs/<name>` of a path below runs/."""
    return "/".join(Path(path).parts[:2])


def test_the_quick_start_is_the_two_commands_ci_runs():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert tuple(blocks[:2]) == QUICK_START
    assert QUICK_START[1].split("&& ")[-1] in (ROOT / ".ci" / "run").read_text()


def test_readme_commands_parse_and_read_only_runs_written_above_them():
    commands = moevit_commands((ROOT / "README.md").read_text())
    assert len(commands) > 20
    parser = build_parser()
    written = {"runs/demo"}  # `moevit demo`, the quick start, links its run dir there
    for argv in commands:
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"`moevit {shlex.join(argv)}` does not parse")
        assert all("=" in word and not word.startswith("-") for word in extra), argv
        overrides = dict(word.split("=", 1) for word in [*getattr(args, "overrides", []), *extra])
        for name in ("checkpoint", "init"):
            path = getattr(args, name, None)
            if path is not None and str(path).startswith("runs/"):
                assert run_of(str(path)) in written, (
                    f"`moevit {shlex.join(argv)}` reads {path} before it exists"
                )
        if args.command == "ckpt":
            assert run_of(str(args.checkpoint)) in written, argv
        config = getattr(args, "config", None)
        if config and str(config).startswith("runs/"):
            assert run_of(str(config)) in written, (
                f"`moevit {shlex.join(argv)}` reads {config} before it exists"
            )
        if args.command in ("train", "submit") and config == "configs/demo.yaml":
            # The demo config's output_dir is runs/demo, the demo's run: a new run needs its own.
            assert overrides.get("output_dir", "runs/demo") != "runs/demo", argv
        if "output_dir" in overrides:
            written.add(run_of(overrides["output_dir"]))
        if getattr(args, "out", None) is not None:
            written.add(run_of(str(args.out)))
        if args.command == "expand" and args.settings:  # the expanded config trains into the settings' dir
            written.add(run_of(yaml.safe_load(Path(ROOT / args.settings).read_text())["output_dir"]))
