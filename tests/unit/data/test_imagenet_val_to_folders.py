"""datasets/imagenet_val_to_folders.py sorts a flat val folder so that ImageNetFolder can read it."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

from moevit.data import ImageNetFolder

SCRIPT = Path(__file__).resolve().parents[3] / "datasets" / "imagenet_val_to_folders.py"
WNIDS = ["n01440764", "n01443537"]
# ILSVRC2012_IDs in the devkit are not in wnid order: here ID 2 is the first wnid.
ID_TO_WNID = {1: WNIDS[1], 2: WNIDS[0]}
LABELS = {
    "ILSVRC2012_val_00000001": WNIDS[1],
    "ILSVRC2012_val_00000002": WNIDS[0],
    "ILSVRC2012_val_00000003": WNIDS[1],
}


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("imagenet_val_to_folders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flat_val(tmp_path):
    from PIL import Image

    val_dir = tmp_path / "imagenet" / "val"
    val_dir.mkdir(parents=True)
    for stem in LABELS:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(val_dir / f"{stem}.JPEG")
    return val_dir


def _write_loc_csv(path: Path) -> Path:
    rows = [f"{stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for stem, wnid in LABELS.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


def test_loc_csv_sorts_into_readable_class_folders(script, flat_val, tmp_path):
    assert (
        script.main(["--val-dir", str(flat_val), "--loc-csv", str(_write_loc_csv(tmp_path / "loc.csv"))]) == 0
    )
    dataset = ImageNetFolder(flat_val.parent, "val")
    assert dataset.classes == WNIDS
    assert [(key_label[0].split("/")[1], key_label[1]) for key_label in dataset.samples] == [
        (WNIDS[0], 0),
        (WNIDS[1], 1),
        (WNIDS[1], 1),
    ]
    assert not list(flat_val.glob("*.JPEG")), "every flat file was moved"
    # A second run finds everything in place and moves nothing.
    assert script.sort_into_folders(flat_val, script.labels_from_loc_csv(tmp_path / "loc.csv")) == 0


def test_missing_image_is_reported_before_anything_moves(script, flat_val, tmp_path):
    (flat_val / "ILSVRC2012_val_00000003.JPEG").unlink()
    with pytest.raises(
        FileNotFoundError, match="1 labelled images are missing .*ILSVRC2012_val_00000003.JPEG"
    ):
        script.sort_into_folders(flat_val, script.labels_from_loc_csv(_write_loc_csv(tmp_path / "loc.csv")))
    assert len(list(flat_val.glob("*.JPEG"))) == 2


def test_devkit_ground_truth_maps_ids_through_meta(script, flat_val, tmp_path, monkeypatch):
    ground_truth = "\n".join(str(ilsvrc_id) for ilsvrc_id in (1, 2, 1)) + "\n"
    devkit_tar = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit_tar, "w:gz") as archive:
        for name, content in [(script.GROUND_TRUTH, ground_truth.encode()), (script.META, b"meta.mat bytes")]:
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    # meta.mat parsing needs scipy; the mapping it yields is stubbed, the tar and ground-truth handling is real.
    monkeypatch.setattr(
        script, "wnids_by_ilsvrc_id", lambda meta: ID_TO_WNID if meta == b"meta.mat bytes" else {}
    )
    assert script.labels_from_devkit(devkit_tar) == LABELS
    script.main(["--val-dir", str(flat_val), "--devkit", str(devkit_tar), "--copy"])
    assert sorted(path.relative_to(flat_val).as_posix() for path in flat_val.glob("*/*.JPEG")) == sorted(
        f"{wnid}/{stem}.JPEG" for stem, wnid in LABELS.items()
    )
    assert len(list(flat_val.glob("*.JPEG"))) == 3, "--copy leaves the flat files"
