"""The README's resharding promise for data (moevit.data.sampler.reshard_sampler_state): a task's global
sample stream continues exactly at the new world size when the dataset and the samples read divide
evenly over both world sizes; otherwise the rest of the epoch is skipped and the next one starts."""

from __future__ import annotations

from itertools import islice

import pytest

from moevit.data.sampler import ResumableDistributedSampler, reshard_sampler_state


def global_stream(size: int, world: int, start_state: dict | None, count: int) -> list[tuple[int, int]]:
    """The next `count` (stream position, index) pairs all `world` ranks read together, in stream order."""
    pairs = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(size, rank=rank, world_size=world, seed=3)
        if start_state is not None:
            sampler.load_state_dict(start_state)
        pairs += [(p, i) for i, p in islice(sampler.iter_with_positions(), count // world)]
    return sorted(pairs)


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2), (2, 4)])
def test_an_even_split_continues_the_stream_exactly(old_world, new_world):
    size, read_per_rank = 16, 4  # 8 or 16 samples read: divisible by every world size here
    saved = ResumableDistributedSampler(size, world_size=old_world, seed=3).state_at(read_per_rank)
    state, _, exact = reshard_sampler_state(saved, new_world)
    assert exact
    uninterrupted = global_stream(size, old_world, None, 2 * size)
    read = read_per_rank * old_world
    assert global_stream(size, new_world, state, size) == uninterrupted[read : read + size]


def test_an_uneven_split_skips_to_the_next_epoch_and_says_so():
    size = 15  # odd: two ranks pad the epoch, one does not
    saved = ResumableDistributedSampler(size, world_size=2, seed=3).state_at(3)
    state, _, exact = reshard_sampler_state(saved, 1)
    assert not exact and (state["epoch"], state["position"]) == (1, 0)
    next_epoch = ResumableDistributedSampler(size, world_size=1, seed=3).epoch_indices(1).tolist()
    assert [i for _, i in global_stream(size, 1, state, size)] == next_epoch
