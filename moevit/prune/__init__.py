"""Expert pruning: per-task usage (usage.py), criteria (criteria.py), costs (cost.py), extraction of a
standalone model (extract.py) described by a manifest (manifest.py), reports (report.py), sweeps
(sweep.py); `moevit prune` (cli.py). Loading a pruned model (`load_pruned`) needs only manifest.py and
the model code: no DeepSpeed, no source checkpoint."""

from moevit.artifacts.model_dir import Manifest, ManifestError, is_pruned_dir, load_pruned

__all__ = ["Manifest", "ManifestError", "is_pruned_dir", "load_pruned"]
