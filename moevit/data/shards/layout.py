"""On-disk layout of a moevit shard directory (WebDataset tar shards, https://github.com/webdataset/webdataset).

A directory holds one split of one dataset:

    out_dir/{split}-000000.tar, {split}-000001.tar, ...   samples, in the folder reader's order
    out_dir/_info.json                                    written last: its presence means "complete"

Each sample is a group of tar members sharing a key, with the ORIGINAL file bytes (nothing re-encoded):

    imagenet  {key}.jpg (the source file, whatever its real format) + {key}.cls (label, ASCII int)
    coco      {key}.jpg + {key}.json ({"image": image record, "annotations": [raw annotation dicts]})
    ade20k    {key}.jpg + {key}.png (the label PNG as stored, before reduce_zero_label)

WebDataset splits a member name at the first dot of its last path component into key and extension,
so keys (the folder readers' ``"key"``, e.g. ``train/n01440764/n01440764_10026``) are stored
percent-encoded: ``%`` -> ``%25``, ``.`` -> ``%2E``, ``/`` -> ``%2F``. The mapping is reversible, so the
reader returns exactly the folder reader's key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from moevit.data.errors import DatasetLayoutError
from moevit.fileio import write_text_atomically

INFO_FILE = "_info.json"
LAYOUT_NAME = "moevit-webdataset-shards"
LAYOUT_VERSION = 1
DATASET_TASK_TYPES = {"imagenet": "classification", "coco": "detection", "ade20k": "segmentation"}
EXPECTED_LAYOUT = f"a directory written by `moevit data shard`: *.tar shards and {INFO_FILE}"


def encode_key(key: str) -> str:
    """The folder reader's key as a tar member stem: no dot or slash, so WebDataset groups it as one key."""
    return key.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def decode_key(stored_key: str) -> str:
    """Inverse of :func:`encode_key`."""
    return unquote(stored_key)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardEntry:
    """One tar file of the directory and how many samples it holds."""

    name: str
    num_samples: int


@dataclass(frozen=True)
class ShardInfo:
    """The content of ``_info.json``: what a shard directory holds.

    Args:
        directory: the shard directory (not stored in the JSON).
        dataset: "imagenet", "coco" or "ade20k".
        split: the split name as the folder reader resolved it ("train", "val", "training", ...).
        shards: the tar files in sample order.
        classes: class names in label order (ImageNet wnids, COCO category names; empty for ADE20K,
            whose class names are not part of its files).
        source_root: the dataset root the shards were written from.
        missing: ``{"key", "path"}`` of samples whose file did not exist when writing (left out).
        label_to_cat_id: COCO only: label -> COCO category id.
        annotation_file: COCO only: the source ``instances_*.json``, which evaluation (COCOeval) reads.
    """

    directory: Path
    dataset: str
    split: str
    shards: tuple[ShardEntry, ...]
    classes: tuple[str, ...]
    source_root: str
    missing: tuple[dict, ...] = ()
    label_to_cat_id: tuple[int, ...] | None = None
    annotation_file: str | None = None

    @property
    def task_type(self) -> str:
        return DATASET_TASK_TYPES[self.dataset]

    @property
    def num_samples(self) -> int:
        return sum(entry.num_samples for entry in self.shards)

    @property
    def shard_paths(self) -> list[str]:
        return [os.fspath(self.directory / entry.name) for entry in self.shards]

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        """COCO category id -> label (ints: the JSON stores the list ``label_to_cat_id``, not string keys)."""
        if self.label_to_cat_id is None:
            raise AttributeError(
                f"{self.directory} holds {self.dataset} shards, which have no COCO categories"
            )
        return {cat_id: label for label, cat_id in enumerate(self.label_to_cat_id)}

    def to_json(self) -> dict:
        record = {
            "layout": LAYOUT_NAME,
            "version": LAYOUT_VERSION,
            "dataset": self.dataset,
            "task_type": self.task_type,
            "split": self.split,
            "num_samples": self.num_samples,
            "shards": [{"name": entry.name, "num_samples": entry.num_samples} for entry in self.shards],
            "classes": list(self.classes),
            "source_root": self.source_root,
            "missing": list(self.missing),
        }
        if self.label_to_cat_id is not None:
            record["label_to_cat_id"] = list(self.label_to_cat_id)
            record["annotation_file"] = self.annotation_file
            record["annotation_file_name"] = Path(self.annotation_file).name
        return record

    def save(self) -> Path:
        """Writes ``_info.json`` atomically, so a reader never sees half of it."""
        return write_text_atomically(self.directory / INFO_FILE, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShardInfo:
        """Reads and checks ``directory/_info.json`` and that every shard it lists exists.

        Raises:
            DatasetLayoutError: no directory, no or unreadable info file, another layout or version,
                or a listed shard missing.
        """
        directory = Path(directory)
        path = directory / INFO_FILE
        if not path.is_file():
            raise DatasetLayoutError(f"shard info {path} not found; expected {EXPECTED_LAYOUT}")
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetLayoutError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
        if not isinstance(record, dict):
            raise DatasetLayoutError(f"{path} is not a JSON object; expected {EXPECTED_LAYOUT}")
        found = (record.get("layout"), record.get("version"))
        if found != (LAYOUT_NAME, LAYOUT_VERSION):
            raise DatasetLayoutError(
                f"{path} is not {LAYOUT_NAME} version {LAYOUT_VERSION} (found layout and version {found}); "
                "rewrite the shards with `moevit data shard`"
            )
        if record.get("dataset") not in DATASET_TASK_TYPES:
            raise DatasetLayoutError(
                f"{path}: dataset {record.get('dataset')!r} is not one of {sorted(DATASET_TASK_TYPES)}"
            )
        try:
            label_to_cat_id = record.get("label_to_cat_id")
            info = cls(
                directory=directory,
                dataset=record["dataset"],
                split=record["split"],
                shards=tuple(
                    ShardEntry(entry["name"], int(entry["num_samples"])) for entry in record["shards"]
                ),
                classes=tuple(record["classes"]),
                source_root=record["source_root"],
                missing=tuple(record["missing"]),
                label_to_cat_id=None if label_to_cat_id is None else tuple(int(i) for i in label_to_cat_id),
                annotation_file=record.get("annotation_file"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetLayoutError(
                f"{path} lacks or mangles a field ({type(err).__name__}: {err})"
            ) from err
        if not info.shards:
            raise DatasetLayoutError(f"{path} lists no shards")
        absent = [entry.name for entry in info.shards if not (directory / entry.name).is_file()]
        if absent:
            raise DatasetLayoutError(f"shards {absent[:5]} listed in {path} not found in {directory}")
        return info
