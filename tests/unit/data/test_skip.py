"""SkipCorrupt: corrupt samples are skipped, logged once, counted, and replaced by the next index."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from moevit.data import ImageNetFolder, SkipCorrupt
from moevit.data.collate import collate_classification
from moevit.data.errors import CorruptSampleError, TooManyCorruptSamplesError
from moevit.data.transforms import build_transforms


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.transform(self.dataset[index])


@pytest.fixture
def imagenet_with_truncated_file(imagenet_fixture, dataset_writers):
    """The ImageNet fixture plus a truncated JPEG sorted first in the first class folder."""
    wnid = imagenet_fixture.classes[0]
    truncated = dataset_writers.truncated_jpeg(imagenet_fixture.root / "train" / wnid / f"{wnid}_0.JPEG")
    dataset = ImageNetFolder(imagenet_fixture.root, "train")
    assert dataset.samples[0][0].endswith(truncated.name)
    return dataset, truncated


def test_reader_raises_corrupt_sample_error_for_truncated_jpeg(imagenet_with_truncated_file):
    dataset, truncated = imagenet_with_truncated_file
    with pytest.raises(CorruptSampleError, match="image file is truncated") as raised:
        dataset[0]
    assert raised.value.path == str(truncated)


def test_truncated_sample_is_replaced_by_the_next_and_counted(imagenet_with_truncated_file, caplog):
    dataset, truncated = imagenet_with_truncated_file
    skipping = SkipCorrupt(dataset)
    assert len(skipping) == len(dataset)
    with caplog.at_level(logging.WARNING, logger="moevit.data.skip"):
        first = skipping[0]
        again = skipping[0]
    assert first["key"] == dataset[1]["key"] and first["num_skipped"] == 1
    assert torch.equal(first["image"], again["image"])
    assert skipping[1]["num_skipped"] == 0
    assert skipping.num_skipped == 2
    warnings = [record for record in caplog.records if str(truncated) in record.getMessage()]
    assert len(warnings) == 1, "each corrupt path is logged once"


def test_substitution_wraps_around_at_the_end(imagenet_fixture, dataset_writers):
    wnid = imagenet_fixture.classes[-1]
    dataset_writers.truncated_jpeg(imagenet_fixture.root / "train" / wnid / f"{wnid}_9.JPEG")
    dataset = ImageNetFolder(imagenet_fixture.root, "train")
    sample = SkipCorrupt(dataset)[len(dataset) - 1]
    assert sample["key"] == dataset[0]["key"] and sample["num_skipped"] == 1


def test_all_tries_failing_raises_a_clear_error(tmp_path, dataset_writers):
    wnid_dir = tmp_path / "train" / "n00000001"
    for index in range(3):
        dataset_writers.truncated_jpeg(wnid_dir / f"broken_{index}.JPEG")
    skipping = SkipCorrupt(ImageNetFolder(tmp_path, "train"), max_tries=2)
    with pytest.raises(TooManyCorruptSamplesError, match="samples 1 to 2 .*unreadable.*broken_2.JPEG"):
        skipping[1]


def test_skip_count_reaches_the_batch_through_dataloader_workers(imagenet_with_truncated_file):
    dataset, _ = imagenet_with_truncated_file
    transformed = _Transformed(
        SkipCorrupt(dataset), build_transforms("classification", train=False, image_size=16)
    )
    loader = DataLoader(transformed, batch_size=4, num_workers=1, collate_fn=collate_classification)
    batches = list(loader)
    assert [batch["num_skipped"] for batch in batches] == [1, 0]
    assert sum(len(batch["labels"]) for batch in batches) == len(dataset)


def test_wrapper_exposes_reader_metadata(imagenet_fixture):
    assert SkipCorrupt(ImageNetFolder(imagenet_fixture.root, "train")).classes == imagenet_fixture.classes


def test_corrupt_sample_error_survives_pickling():
    error = pickle.loads(pickle.dumps(CorruptSampleError("/data/a.JPEG", "file not found")))
    assert (error.path, error.reason, str(error)) == (
        "/data/a.JPEG",
        "file not found",
        "/data/a.JPEG: file not found",
    )
