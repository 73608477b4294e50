"""Shared test settings: one thread per process keeps timings stable on the 2-core CI machine."""

import torch

torch.set_num_threads(1)
