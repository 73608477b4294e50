"""Procedural, deterministic synthetic datasets written in the real ImageNet, COCO and ADE20K layouts.

The embedded default data of moevit: the demo and the tests train on it through the same readers as
real data. Design and class lists: datasets/synthetic.md.
"""

from moevit.data.synth.generate import synthetic_data_is_complete, write_synthetic_datasets

__all__ = ["synthetic_data_is_complete", "write_synthetic_datasets"]
