"""Sort the flat ImageNet (ILSVRC-2012) validation set into ``val/<wnid>/`` class folders.

The official validation archive ``ILSVRC2012_img_val.tar`` unpacks to 50,000 files
``ILSVRC2012_val_00000001.JPEG`` ... in one folder, while ``moevit.data.imagenet.ImageNetFolder``
reads ``val/<wnid>/*.JPEG``. The class of each file comes from one of:

- the devkit (``ILSVRC2012_devkit_t12.tar.gz`` or its unpacked folder):
  ``data/ILSVRC2012_validation_ground_truth.txt`` holds one ILSVRC2012_ID per image in file order and
  ``data/meta.mat`` maps ILSVRC2012_IDs to wnids (reading it needs scipy);
- Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of the prediction
  string is the wnid).

Usage:
    python datasets/imagenet_val_to_folders.py --val-dir IMAGENET/val --devkit ILSVRC2012_devkit_t12.tar.gz
    python datasets/imagenet_val_to_folders.py --val-dir IMAGENET/val --loc-csv LOC_val_solution.csv

Files are moved (``--copy`` copies instead); files already in their class folder are left alone, so
an interrupted run can be repeated. ``--dry-run`` only checks that every labelled file is present.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
EXTENSION = ".JPEG"


def labels_from_loc_csv(csv_path: Path) -> dict[str, str]:
    """Image stem -> wnid from Kaggle's LOC_val_solution.csv."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a CSV with columns ImageId,PredictionString")
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}


def read_devkit_file(devkit: Path, relative_path: str) -> bytes:
    """Reads ``relative_path`` from the devkit folder or from the devkit .tar.gz."""
    if devkit.is_dir():
        path = devkit / relative_path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; --devkit must be the ILSVRC2012_devkit_t12 folder")
        return path.read_bytes()
    with tarfile.open(devkit) as archive:
        for member in archive.getmembers():
            if member.name.endswith(relative_path):
                return archive.extractfile(member).read()
    raise FileNotFoundError(f"{relative_path} not found in {devkit}")


def wnids_by_ilsvrc_id(meta_mat: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf synsets listed in the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise SystemExit(
            "reading the devkit's meta.mat needs scipy (pip install scipy), or use --loc-csv"
        ) from err
    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    # meta.mat lists the whole hierarchy; the 1000 classes are the synsets without children.
    return {
        int(synset["ILSVRC2012_ID"]): str(synset["WNID"])
        for synset in synsets
        if int(synset["num_children"]) == 0
    }


def labels_from_devkit(devkit: Path) -> dict[str, str]:
    """Image stem -> wnid from the devkit's ground truth and meta.mat."""
    id_to_wnid = wnids_by_ilsvrc_id(read_devkit_file(devkit, META))
    ids = read_devkit_file(devkit, GROUND_TRUTH).decode().split()
    return {
        f"ILSVRC2012_val_{index:08d}": id_to_wnid[int(ilsvrc_id)]
        for index, ilsvrc_id in enumerate(ids, start=1)
    }


def sort_into_folders(
    val_dir: Path, labels: dict[str, str], copy: bool = False, dry_run: bool = False
) -> int:
    """Moves (or copies) each ``val_dir/<stem>.JPEG`` to ``val_dir/<wnid>/``; returns how many it placed.

    Raises FileNotFoundError, before touching anything, when a labelled file is in neither place.
    """
    pending = []
    missing = []
    for stem, wnid in sorted(labels.items()):
        source, target = val_dir / f"{stem}{EXTENSION}", val_dir / wnid / f"{stem}{EXTENSION}"
        if target.exists():
            continue
        if source.exists():
            pending.append((source, target))
        else:
            missing.append(source.name)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} labelled images are missing from {val_dir}, e.g. {missing[:3]}"
        )
    if dry_run:
        return 0
    for source, target in pending:
        target.parent.mkdir(exist_ok=True)
        if copy:
            shutil.copy2(source, target)
        else:
            source.replace(target)
    return len(pending)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val-dir", type=Path, required=True, help="folder with the 50,000 flat val images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12 folder or .tar.gz")
    source.add_argument("--loc-csv", type=Path, help="Kaggle's LOC_val_solution.csv")
    parser.add_argument("--copy", action="store_true", help="copy instead of moving")
    parser.add_argument("--dry-run", action="store_true", help="check that every labelled image is present")
    args = parser.parse_args(argv)
    if not args.val_dir.is_dir():
        parser.error(f"--val-dir {args.val_dir} is not a folder")
    labels = labels_from_devkit(args.devkit) if args.devkit else labels_from_loc_csv(args.loc_csv)
    placed = sort_into_folders(args.val_dir, labels, copy=args.copy, dry_run=args.dry_run)
    if args.dry_run:
        print(f"all {len(labels)} labelled images are in {args.val_dir} (flat or already sorted)")
    else:
        verb = "copied" if args.copy else "moved"
        print(f"{verb} {placed} images into {len(set(labels.values()))} class folders under {args.val_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
