"""The single-process stand-in for the DeepSpeed engine that unit tests drive MultiTaskStep with
(importable from any test under tests/unit: tests/unit/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import torch


class LocalEngine:
    """Stand-in for the DeepSpeed engine of moevit.parallel.engine, single process, plain SGD."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.1):
        self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.backward_calls = 0

    def __call__(self, task, batch):
        return self.module(task, batch)

    def backward(self, loss):
        self.backward_calls += 1
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]
