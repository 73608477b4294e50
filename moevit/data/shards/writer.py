"""Write one split of an ImageNet, COCO or ADE20K folder dataset as WebDataset tar shards.

The folder readers (``moevit.data.imagenet``, ``coco``, ``ade20k``) check the layout and fix the sample
order; this module copies each sample's original file bytes, without decoding or re-encoding, into
``{split}-NNNNNN.tar`` files of ``shard_size`` samples, then writes ``_info.json`` (see ``layout``).
Reading the shards back decodes the same bytes with the same functions, so shard samples equal folder
samples. Tar headers carry a fixed mtime and owner: the same input gives byte-identical shards.

A file that an annotation or a listing refers to but that is gone when writing is left out, logged and
listed under ``"missing"`` in ``_info.json`` (the folder reader would raise ``CorruptSampleError`` for
it). Files that exist but are damaged are copied as they are; the shard reader skips and counts them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import webdataset as wds

from moevit.data.ade20k import ADE20K
from moevit.data.coco import CocoDetection
from moevit.data.errors import DatasetLayoutError
from moevit.data.imagenet import ImageNetFolder
from moevit.data.shards.layout import DATASET_TASK_TYPES, ShardEntry, ShardInfo, encode_key, shard_name

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000


class SourceSample(NamedTuple):
    """One sample to write: its key, the files copied as members and members built from annotations."""

    key: str
    files: dict[str, Path]
    inline: dict[str, bytes]


class SourceDataset(NamedTuple):
    """A split as the folder reader sees it: resolved split name, samples in order, and ``ShardInfo`` fields."""

    split: str
    samples: Iterator[SourceSample]
    info_fields: dict


def _imagenet_source(root: Path, split: str) -> SourceDataset:
    reader = ImageNetFolder(root, split)
    samples = (
        SourceSample(
            key=os.path.splitext(relative_path)[0],
            files={"jpg": reader.root / relative_path},
            inline={"cls": str(label).encode("ascii")},
        )
        for relative_path, label in reader.samples
    )
    return SourceDataset(reader.split, samples, {"classes": tuple(reader.classes)})


def _coco_source(root: Path, split: str) -> SourceDataset:
    reader = CocoDetection(root, split)

    def samples() -> Iterator[SourceSample]:
        for image_id in reader.image_ids:
            record = reader.coco.imgs[image_id]
            # The image record and its raw annotations: the reader rebuilds the target from exactly the
            # inputs CocoDetection uses, so filtering rules live in one place (decode.py).
            annotations = {"image": record, "annotations": reader.coco.imgToAnns[image_id]}
            yield SourceSample(
                key=f"{reader.split}2017/{os.path.splitext(record['file_name'])[0]}",
                files={"jpg": reader.image_dir / record["file_name"]},
                inline={"json": json.dumps(annotations, sort_keys=True).encode("utf-8")},
            )

    info_fields = {
        "classes": tuple(reader.classes),
        "label_to_cat_id": tuple(reader.label_to_cat_id),
        "annotation_file": os.fspath(reader.annotation_file.resolve()),
    }
    return SourceDataset(reader.split, samples(), info_fields)


def _ade20k_source(root: Path, split: str) -> SourceDataset:
    reader = ADE20K(root, split)
    samples = (
        SourceSample(
            key=f"images/{reader.split}/{os.path.splitext(image_name)[0]}",
            files={
                "jpg": reader.image_dir / image_name,
                "png": reader.annotation_dir / f"{os.path.splitext(image_name)[0]}.png",
            },
            inline={},
        )
        for image_name in reader.image_names
    )
    return SourceDataset(reader.split, samples, {"classes": ()})


SOURCES: dict[str, Callable[[Path, str], SourceDataset]] = {
    "imagenet": _imagenet_source,
    "coco": _coco_source,
    "ade20k": _ade20k_source,
}


class _ShardSequence:
    """Tar files of at most ``shard_size`` samples each, opened as samples arrive."""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.entries: list[ShardEntry] = []
        self.written_paths: list[Path] = []
        self._file = None
        self._tar: wds.TarWriter | None = None
        self._count = 0

    def write(self, stored_key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            path = self.out_dir / shard_name(self.split, len(self.entries))
            self.written_paths.append(path)
            self._file = open(path, "wb")  # closed by _finish_shard
            # PAX headers: keys longer than ustar's 100 characters stay intact. mtime 0: reproducible bytes.
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, format="PAX_FORMAT")
        self._tar.write({"__key__": stored_key, **members})
        self._count += 1
        if self._count == self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        self.entries.append(ShardEntry(self.written_paths[-1].name, self._count))
        self._tar, self._file, self._count = None, None, 0

    def close(self) -> list[ShardEntry]:
        if self._tar is not None:
            self._finish_shard()
        return self.entries


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"shard output {out_dir} exists and is not an empty directory; shards of one split go into "
            "their own directory (e.g. shards/imagenet/train): choose a new one or remove it"
        )


def write_shards(
    dataset: str,
    root: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> dict:
    """Writes one split of a folder dataset as WebDataset shards plus ``_info.json`` into ``out_dir``.

    Args:
        dataset: "imagenet", "coco" or "ade20k" (the folder layouts of ``moevit.data``).
        root: the dataset root, as given to the folder reader.
        split: "train" or "val" (or the reader's aliases).
        out_dir: a new or empty directory.
        shard_size: samples per shard; the last shard holds the rest. Training reads need at least one
            shard per rank (and per DataLoader worker when not resampling), so keep it well under
            ``num_samples / (ranks x workers)``.

    Returns:
        ``{"dataset", "task_type", "split", "out_dir", "num_samples", "num_shards", "shard_size",
        "num_missing", "info_file"}``.

    Raises:
        DatasetLayoutError: the folder reader rejects the layout, or no sample file exists at all.
        FileExistsError: ``out_dir`` is not empty.
    """
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(SOURCES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    out = Path(out_dir)
    _check_output_dir(out)
    source = SOURCES[dataset](Path(root), split)
    out.mkdir(parents=True, exist_ok=True)
    shards = _ShardSequence(out, source.split, shard_size)
    missing: list[dict] = []
    try:
        for sample in source.samples:
            try:
                members = {extension: path.read_bytes() for extension, path in sample.files.items()}
            except FileNotFoundError as err:
                logger.warning("sample %s left out of the shards: %s not found", sample.key, err.filename)
                missing.append({"key": sample.key, "path": os.fspath(err.filename)})
                continue
            shards.write(encode_key(sample.key), {**members, **sample.inline})
        entries = shards.close()
    except BaseException:
        shards.close()
        for path in shards.written_paths:
            path.unlink(missing_ok=True)
        raise
    if not entries:
        raise DatasetLayoutError(
            f"no file of the {dataset} {split} split under {root} exists; nothing written"
        )
    info = ShardInfo(
        directory=out,
        dataset=dataset,
        split=source.split,
        shards=tuple(entries),
        source_root=os.fspath(Path(root).resolve()),
        missing=tuple(missing),
        **source.info_fields,
    )
    info_file = info.save()
    summary = {
        "dataset": dataset,
        "task_type": DATASET_TASK_TYPES[dataset],
        "split": source.split,
        "out_dir": os.fspath(out),
        "num_samples": info.num_samples,
        "num_shards": len(entries),
        "shard_size": shard_size,
        "num_missing": len(missing),
        "info_file": os.fspath(info_file),
    }
    logger.info("wrote %s", summary)
    return summary
