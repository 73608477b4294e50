"""Writes the three synthetic datasets (ImageNet, COCO and ADE20K layouts) and the marker that says so.

    out_dir/imagenet/...   see synth/imagenet.py
    out_dir/coco/...       see synth/coco.py (synth/coco_real.py for the true-resolution `real` preset)
    out_dir/ade20k/...     see synth/ade20k.py (synth/ade20k_real.py for the `real` preset)
    out_dir/_synth.json    generator version, seed, size, spec, summary and whether writing finished

The marker is written first with "complete": false and rewritten with true at the end, so an
interrupted run is recognised, and so is a directory this generator did not write (no marker):
that one is never overwritten.
"""

import json
import shutil
from pathlib import Path

from moevit.data.synth import real_spec
from moevit.data.synth.ade20k import DATASET_DIR as ADE20K_DATASET_DIR
from moevit.data.synth.ade20k import write_ade20k
from moevit.data.synth.ade20k_real import write_ade20k_real
from moevit.data.synth.coco import write_coco
from moevit.data.synth.coco_real import write_coco_real
from moevit.data.synth.imagenet import write_imagenet
from moevit.data.synth.spec import (
    ADE20K_IMAGE_SIZE,
    COCO_IMAGE_SIZE,
    GENERATOR_VERSION,
    IMAGENET_IMAGE_SIZE,
    JPEG_QUALITY,
    SIZES,
)
from moevit.fileio import write_text_atomically

MARKER_FILE = "_synth.json"
DATASET_DIRS = ("imagenet", "coco", "ade20k")


def _image_sizes(size: str) -> dict:
    """Each dataset's (height, width), or for the true-resolution preset the sizes its images are drawn from."""
    if SIZES[size].true_resolution:
        return {
            "imagenet": sorted(set(real_spec.IMAGENET_SIZES)),
            "coco": sorted(set(real_spec.COCO_SIZES)),
            "ade20k": sorted(set(real_spec.ADE20K_SIZES)),
        }
    return {"imagenet": IMAGENET_IMAGE_SIZE, "coco": COCO_IMAGE_SIZE, "ade20k": ADE20K_IMAGE_SIZE}


def _marker_header(seed: int, size: str) -> dict:
    """Everything that determines the written bytes, JSON round-tripped (tuples become lists) so that it
    compares equal to a marker read back from disk."""
    header = {
        "generator": "moevit.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        # The counts only (true_resolution is implied by the size name): the toy presets' markers stay
        # what earlier versions wrote, so their existing outputs are still recognised as complete.
        "image_counts": {
            "imagenet_per_class": SIZES[size].imagenet_per_class,
            "coco": SIZES[size].coco,
            "ade20k": SIZES[size].ade20k,
        },
        "image_sizes": _image_sizes(size),
        "jpeg_quality": JPEG_QUALITY,
    }
    return json.loads(json.dumps(header))


def _check_arguments(seed: int, size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown synthetic data size {size!r}; expected one of {sorted(SIZES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"synthetic data seed must be a non-negative int, got {seed!r}")


def _write_marker(out: Path, marker: dict) -> None:
    write_text_atomically(out / MARKER_FILE, json.dumps(marker, indent=2) + "\n")


def _clear_previous_output(out: Path) -> None:
    """Remove what an earlier run of this generator wrote; refuse to touch anything else."""
    if not (out / MARKER_FILE).exists():
        foreign = [name for name in DATASET_DIRS if (out / name).exists()]
        if foreign:
            raise FileExistsError(
                f"{out} already holds {foreign} but no {MARKER_FILE}: not written by the synthetic "
                "generator, so it is not overwritten; choose another output directory"
            )
        return
    for name in DATASET_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def write_synthetic_datasets(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the synthetic ImageNet, COCO and ADE20K datasets under `out_dir`, replacing an earlier output.

    Same (seed, size) gives byte-identical files (with the same numpy, Pillow and libjpeg). Not safe
    to call from several processes at once on one directory: call it from one, then read from all.

    Returns:
        {"imagenet" | "coco" | "ade20k": {"num_classes": int, "images": {split: number of images}}}
    """
    _check_arguments(seed, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out)
    header = _marker_header(seed, size)
    _write_marker(out, {**header, "complete": False})
    counts = SIZES[size]
    if counts.true_resolution:
        summary = {
            "imagenet": write_imagenet(
                out / "imagenet", seed, counts.imagenet_per_class, true_resolution=True
            ),
            "coco": write_coco_real(out / "coco", seed, counts.coco),
            "ade20k": write_ade20k_real(out / "ade20k", seed, counts.ade20k),
        }
    else:
        summary = {
            "imagenet": write_imagenet(
                out / "imagenet", seed, counts.imagenet_per_class, IMAGENET_IMAGE_SIZE
            ),
            "coco": write_coco(out / "coco", seed, counts.coco, COCO_IMAGE_SIZE),
            "ade20k": write_ade20k(out / "ade20k", seed, counts.ade20k, ADE20K_IMAGE_SIZE),
        }
    _write_marker(out, {**header, "complete": True, "summary": summary})
    return summary


def _files_match_summary(out: Path, summary: dict) -> bool:
    """Whether every image, label PNG and annotation file of the summary is still on disk."""
    ade20k = out / "ade20k" / ADE20K_DATASET_DIR
    expected_and_found = []
    for split, count in summary["imagenet"]["images"].items():
        expected_and_found.append((count, out / "imagenet" / split, "*/*.JPEG"))
    for split, count in summary["coco"]["images"].items():
        expected_and_found.append((count, out / "coco" / split, "*.jpg"))
        expected_and_found.append((1, out / "coco" / "annotations", f"instances_{split}.json"))
    for split, count in summary["ade20k"]["images"].items():
        expected_and_found.append((count, ade20k / "images" / split, "*.jpg"))
        expected_and_found.append((count, ade20k / "annotations" / split, "*.png"))
    return all(sum(1 for _ in folder.glob(pattern)) == count for count, folder, pattern in expected_and_found)


def synthetic_data_is_complete(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> bool:
    """Whether `out_dir` holds a finished write of exactly (seed, size) by this generator version,
    with none of its files deleted since."""
    _check_arguments(seed, size)
    out = Path(out_dir)
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    header = _marker_header(seed, size)
    if not marker.get("complete") or any(marker.get(key) != value for key, value in header.items()):
        return False
    return _files_match_summary(out, marker["summary"])
