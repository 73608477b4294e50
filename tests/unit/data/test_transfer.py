"""Host-to-device transfer decisions, checked without CUDA: loaders pin memory and `move_batch` copies
with non_blocking=True only when the batches go to a CUDA device."""

from __future__ import annotations

import torch

from moevit.data.collate import copies_asynchronously, move_batch, pins_memory


class RecordingTensor(torch.Tensor):
    """A CPU tensor whose `.to(...)` records its arguments and stays put (no CUDA needed)."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.calls.append((args[1:], kwargs))
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def recorded_moves(device) -> list:
    RecordingTensor.calls = []
    batch = {
        "images": torch.zeros(2, 3, 4, 4).as_subclass(RecordingTensor),
        "targets": [{"boxes": torch.zeros(1, 4).as_subclass(RecordingTensor)}],
        "keys": ["a", "b"],
    }
    move_batch(batch, device)
    return RecordingTensor.calls


def test_only_cuda_targets_pin_and_copy_asynchronously():
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert pins_memory(device) and copies_asynchronously(device)
    for device in ("cpu", torch.device("cpu"), "meta"):
        assert not pins_memory(device) and not copies_asynchronously(device)


def test_move_batch_copies_to_cuda_without_blocking_and_to_the_cpu_blocking():
    to_cuda = recorded_moves(torch.device("cuda", 0))
    assert to_cuda == [((torch.device("cuda", 0),), {"non_blocking": True})] * 2  # nested targets too
    to_cpu = recorded_moves(torch.device("cpu"))
    assert to_cpu == [((torch.device("cpu"),), {"non_blocking": False})] * 2
