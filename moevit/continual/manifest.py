"""The directory `moevit expand` writes, and its manifest.

DIR/model.pt      single-device weights of the expanded model (stacked experts, like a pruned model's)
DIR/config.yaml   the training config: the source run's, plus the new task and a `continual:` section
DIR/expand.json   what was done: source checkpoint, new task, experts added and how they started,
                  the freezing, trainable and total parameters, and the bit-identity check of the
                  old tasks (written last: a directory with it is complete)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moevit.config.errors import ConfigError

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "expand.json"
FORMAT = "moevit-expanded"
VERSION = 1


def write_expand_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=2) + "\n")
    return path


def read_expand_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an expanded dir; ConfigError naming the file when it is missing or not ours."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(str(directory), f"no {MANIFEST_FILE}: not a complete `moevit expand` output")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(str(path), f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(str(path), f"not a {FORMAT} v{VERSION} manifest (written by `moevit expand`)")
    return data
