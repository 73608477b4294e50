"""WebDataset tar shards of the ImageNet, COCO and ADE20K folder datasets: writer, reader, CLI.

``write_shards`` copies one split's original files into tar shards plus ``_info.json`` (``layout``);
``IndexedShards`` reads them back by sample index, yielding exactly the folder readers' samples, so a
task with ``data.storage: shards`` trains and evaluates through the folder tasks' loader and sampler.
"""

from moevit.data.shards.indexed import IndexedShards
from moevit.data.shards.layout import ShardInfo
from moevit.data.shards.writer import write_shards

__all__ = ["IndexedShards", "ShardInfo", "write_shards"]
