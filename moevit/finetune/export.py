"""Writes a fine-tuned run's last checkpoint as a standalone model directory (manifest.json + model.pt).

The run's checkpoint is DeepSpeed's; its consolidated single-device weights are loaded into the
architecture the manifest describes (a strict, key-by-key check), so `moevit eval` and `load_pruned`
read the result without the init it started from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moevit.artifacts.checkpoints import resolve_checkpoint
from moevit.artifacts.model_dir import WEIGHTS_FILE, Manifest, build_from_manifest, write_manifest
from moevit.parallel.checkpoint import consolidated_state_dict


def export_finetuned(run_dir: Path, manifest: Manifest) -> Path:
    checkpoint = resolve_checkpoint(run_dir, "fine-tuned run")
    model = build_from_manifest(manifest)
    model.load_state_dict(consolidated_state_dict(checkpoint.directory))
    out = run_dir / "model"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    write_manifest(out, manifest)
    return out
