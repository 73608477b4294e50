"""A shard directory read by sample index, so shard tasks go through the same sampler, workers,
per-sample seeding and exact resume as folder tasks (moevit.data.multitask).

``IndexedShards[i]`` is the directory's i-th sample in the order written. Each process (the trainer,
every DataLoader worker) indexes a shard the first time it touches it: it reads the tar headers only,
seeking over the member data (``tarfile`` in seekable mode), and notes each member's offset and size.
Reading a sample is then one ``os.pread`` per member. ``pread`` takes the offset as an argument, so
forked workers sharing an inherited descriptor cannot move each other's file position.

What a training process opens is the shards its batches fall in; no process opens the source folder or
the COCO annotation JSON: COCO boxes travel in each sample's ``.json`` member, ADE20K masks as ``.png``.
Only evaluation's COCOeval needs the split's ground truth as one ``COCO`` object; :attr:`coco` builds it
from the val shards' per-sample JSON, once per process and shard directory.

Damage is per sample, as with folders: a member that is missing or undecodable, or a sample that a
truncated tar no longer holds, raises ``CorruptSampleError`` from ``__getitem__``, which ``SkipCorrupt``
(moevit.data.skip) replaces by the next sample and counts.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

from pycocotools.coco import COCO
from torch.utils.data import Dataset

from moevit.data.errors import CorruptSampleError, DatasetLayoutError
from moevit.data.shards.layout import ShardInfo
from moevit.data.shards.samples import ShardSampleDecoder

# WebDataset's grouping rule: the key is the member path up to the first dot of its last component.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

MAX_OPEN_SHARDS = 64  # descriptors a process keeps open (see _descriptor)
_COCO_CACHE: dict[tuple[str, int], COCO] = {}


def _index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(stored key, {extension: (data offset, size)})]`` of a tar, in member order; what the headers
    of a damaged tar still describe (tarfile stops at the first bad header after the first)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                match = _KEY_AND_EXTENSION.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, extension = match.groups()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][extension] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError):
        pass  # the samples found so far stay readable; the rest are reported one by one as corrupt
    return samples


class IndexedShards(Dataset):
    """Map-style reader of a shard directory written by ``moevit data shard``.

    Args:
        shard_dir: the directory of one split (``moevit data shard --out``).
        dataset: the dataset kind the config expects ("imagenet", "coco", "ade20k").
        reduce_zero_label: ADE20K only, as ``moevit.data.ade20k.ADE20K``.

    Raises:
        DatasetLayoutError: no shard directory, no ``_info.json`` (an empty or unfinished directory),
            a listed shard missing, or shards of another dataset; the message names the path.
    """

    def __init__(self, shard_dir: str | os.PathLike, dataset: str, reduce_zero_label: bool = True) -> None:
        shard_dir = Path(shard_dir)
        if not shard_dir.is_dir():
            raise DatasetLayoutError(
                f"shard directory {shard_dir} not found; write it with `moevit data shard --out {shard_dir}`"
            )
        self.info = ShardInfo.load(shard_dir)
        if self.info.dataset != dataset:
            raise DatasetLayoutError(
                f"{shard_dir / '_info.json'} describes {self.info.dataset} shards, but the config's data.format "
                f"is {dataset}"
            )
        self.decode = ShardSampleDecoder(self.info, reduce_zero_label)
        self.shard_sizes = tuple(entry.num_samples for entry in self.info.shards)
        self._paths = self.info.shard_paths
        self._starts = [0, *itertools.accumulate(self.shard_sizes)][:-1]
        self._indexes: dict[int, list] = {}
        self._descriptors: OrderedDict[int, int] = OrderedDict()  # least recently used first
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.info.num_samples

    def __getstate__(self) -> dict:
        # Workers index and open shards themselves: descriptors do not travel, indexes are rebuilt lazily.
        return {**self.__dict__, "_indexes": {}, "_descriptors": OrderedDict()}

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within the shard) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside [0, {len(self)}) of {self.info.directory}")
        shard = bisect.bisect_right(self._starts, index) - 1  # the last shard starting at or before it
        return shard, index - self._starts[shard]

    def _descriptor(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked after opening: the parent's descriptors are not ours to use
            self._descriptors, self._pid = OrderedDict(), os.getpid()
        if shard in self._descriptors:
            self._descriptors.move_to_end(shard)
        else:
            # A worker meets every shard of its rank over an epoch (ImageNet: ~1300 in all): keep only the
            # recent ones open, well under the usual limit of 1024 descriptors per process.
            if len(self._descriptors) >= MAX_OPEN_SHARDS:
                os.close(self._descriptors.popitem(last=False)[1])
            self._descriptors[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return self._descriptors[shard]

    def raw_sample(self, index: int) -> dict:
        """The sample's members as WebDataset gives them: ``{"__key__", "__url__", extension: bytes}``."""
        shard, within = self.locate(index)
        path = self._paths[shard]
        if shard not in self._indexes:
            self._indexes[shard] = _index_shard(path)
        members = self._indexes[shard]
        if within >= len(members):
            raise CorruptSampleError(
                f"{path}:#{within}",
                f"the shard holds {len(members)} readable samples, {self.shard_sizes[shard]} were written",
            )
        key, extents = members[within]
        descriptor = self._descriptor(shard)
        raw = {"__key__": key, "__url__": path}
        for extension, (offset, size) in extents.items():
            data = os.pread(descriptor, size, offset)
            if len(data) != size:
                raise CorruptSampleError(f"{path}:{key}.{extension}", f"{len(data)} of {size} bytes readable")
            raw[extension] = data
        return raw

    def __getitem__(self, index: int) -> dict:
        return self.decode(self.raw_sample(index))

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in getattr(self, "_descriptors", {}).values():
                os.close(descriptor)

    # The folder readers' metadata, read by the metrics and the heads' checks.

    @property
    def task_type(self) -> str:
        return self.info.task_type

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def label_to_cat_id(self) -> list[int]:
        if self.info.label_to_cat_id is None:
            raise AttributeError(f"{self.info.directory} holds {self.info.dataset} shards, not COCO")
        return list(self.info.label_to_cat_id)

    @property
    def cat_id_to_label(self) -> dict[int, int]:
        return self.info.cat_id_to_label

    @property
    def annotation_file(self) -> Path:
        """COCO only: the ``instances_*.json`` the shards were written from (named in messages; the
        ground truth itself is read from the shards, :attr:`coco`)."""
        if self.info.annotation_file is None:
            raise AttributeError(f"{self.info.directory} holds {self.info.dataset} shards, not COCO")
        return Path(self.info.annotation_file)

    @property
    def coco(self) -> COCO:
        """COCO ground truth of the split for COCOeval, built from the samples' ``.json`` members.

        Built once per process and directory (the key includes ``_info.json``'s mtime, so rewritten
        shards are read again); training never touches it.
        """
        if self.info.label_to_cat_id is None:
            raise AttributeError(f"{self.info.directory} holds {self.info.dataset} shards, not COCO")
        info_file = self.info.directory / "_info.json"
        cache_key = (os.fspath(info_file.resolve()), info_file.stat().st_mtime_ns)
        if cache_key not in _COCO_CACHE:
            _COCO_CACHE[cache_key] = self._build_coco()
        return _COCO_CACHE[cache_key]

    def _build_coco(self) -> COCO:
        images, annotations = [], []
        for shard, path in enumerate(self._paths):
            descriptor = self._descriptor(shard)
            for _key, extents in _index_shard(path):
                if "json" not in extents:
                    continue  # a damaged sample: its image is skipped in evaluation too
                offset, size = extents["json"]
                try:
                    record = json.loads(os.pread(descriptor, size, offset))
                    images.append(record["image"])
                    annotations.extend(record["annotations"])
                except (ValueError, KeyError, TypeError):
                    continue
        if not images:
            raise DatasetLayoutError(
                f"no readable COCO annotation member in the shards of {self.info.directory}"
            )
        categories = [
            {"id": cat_id, "name": name}
            for name, cat_id in zip(self.info.classes, self.info.label_to_cat_id, strict=True)
        ]
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco.createIndex()
        return coco
