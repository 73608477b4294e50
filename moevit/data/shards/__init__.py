"""WebDataset tar shards of the ImageNet, COCO and ADE20K folder datasets: writer, readers, CLI.

``write_shards`` copies one split's original files into tar shards plus ``_info.json`` (``layout``);
``ShardDataset`` reads them back in order and ``ShardPipeline`` as resampled training batches, both
yielding exactly the folder readers' samples.
"""

from moevit.data.shards.layout import ShardInfo
from moevit.data.shards.reader import ShardDataset, ShardPipeline, build_shard_pipeline
from moevit.data.shards.writer import write_shards

__all__ = ["ShardDataset", "ShardInfo", "ShardPipeline", "build_shard_pipeline", "write_shards"]
