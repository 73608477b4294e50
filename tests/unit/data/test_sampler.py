"""ResumableDistributedSampler and its batching view: coverage per rank, padding, exact resume."""

from collections import Counter
from itertools import islice

import pytest
from torch.utils.data import DistributedSampler

from moevit.data.sampler import ResumableBatchSampler, ResumableDistributedSampler


def take(sampler: ResumableDistributedSampler, count: int) -> list[int]:
    return list(islice(iter(sampler), count))


@pytest.mark.parametrize(("dataset_size", "world_size"), [(10, 3), (12, 4), (2, 5), (7, 1)])
def test_ranks_cover_each_epoch_disjointly_with_equal_counts(dataset_size, world_size):
    per_rank = -(-dataset_size // world_size)
    samplers = [ResumableDistributedSampler(dataset_size, r, world_size, seed=9) for r in range(world_size)]
    streams = [take(s, 3 * per_rank) for s in samplers]
    for epoch in range(3):
        epoch_slices = [stream[epoch * per_rank : (epoch + 1) * per_rank] for stream in streams]
        assert all(len(part) == per_rank for part in epoch_slices)
        drawn = Counter(index for part in epoch_slices for index in part)
        assert set(drawn) == set(range(dataset_size))
        # Only the wrap-around padding may repeat an index within an epoch.
        assert sum(drawn.values()) - dataset_size == per_rank * world_size - dataset_size


@pytest.mark.parametrize(("dataset_size", "world_size"), [(10, 3), (2, 5)])
def test_unshuffled_split_and_padding_match_torch_distributed_sampler(dataset_size, world_size):
    for rank in range(world_size):
        reference = list(DistributedSampler(range(dataset_size), world_size, rank, shuffle=False))
        ours = ResumableDistributedSampler(dataset_size, rank, world_size, shuffle=False)
        assert take(ours, 2 * len(reference)) == reference * 2


def test_each_epoch_has_its_own_permutation_from_seed_and_epoch():
    sampler = ResumableDistributedSampler(50, seed=1)
    epochs = [take(sampler, 50) for _ in range(3)]
    assert all(sorted(order) == list(range(50)) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert take(ResumableDistributedSampler(50, seed=1), 150) == epochs[0] + epochs[1] + epochs[2]
    assert take(ResumableDistributedSampler(50, seed=2), 50) != epochs[0]


def test_mid_epoch_state_round_trip_continues_with_the_same_indices():
    original = ResumableDistributedSampler(10, rank=1, world_size=3, seed=4)
    stream = iter(original)
    list(islice(stream, 7))  # 4 per epoch: epoch 1, position 3
    state = original.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    continued = list(islice(stream, 20))

    restored = ResumableDistributedSampler(10, rank=1, world_size=3, seed=4)
    restored.load_state_dict(state)
    assert take(restored, 20) == continued


def test_state_at_jumps_far_ahead_without_replay():
    reference = take(ResumableDistributedSampler(13, rank=0, world_size=2, seed=3), 1_000)
    jumped = ResumableDistributedSampler(13, rank=0, world_size=2, seed=3)
    jumped.load_state_dict(jumped.state_at(950))
    assert jumped.epoch == 950 // 7
    assert take(jumped, 50) == reference[950:]


def test_batches_are_full_cross_epochs_and_follow_the_index_stream():
    reference = take(ResumableDistributedSampler(10, rank=0, world_size=2, seed=5), 24)
    sampler = ResumableDistributedSampler(10, rank=0, world_size=2, seed=5)
    batches = list(islice(iter(ResumableBatchSampler(sampler, 3)), 8))
    assert all(len(batch) == 3 for batch in batches)
    assert [index for batch in batches for index in batch] == reference
    assert sampler.state_dict()["epoch"] == 24 // 5


def test_state_from_another_geometry_is_refused():
    state = ResumableDistributedSampler(10, rank=0, world_size=2, seed=5).state_dict()
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 4"):
        ResumableDistributedSampler(10, rank=0, world_size=4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dataset_size: saved 10, now 11"):
        ResumableDistributedSampler(11, rank=0, world_size=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ResumableDistributedSampler(10, rank=0, world_size=2, seed=5).load_state_dict(
            {**state, "position": 5}
        )
    with pytest.raises(KeyError, match=r"lacks keys \['epoch'\]"):
        ResumableDistributedSampler(10, world_size=2, seed=5).load_state_dict(
            {k: v for k, v in state.items() if k != "epoch"}
        )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dataset_size must be an int > 0, got 0"):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        ResumableDistributedSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        ResumableDistributedSampler(10, seed=-1)
    with pytest.raises(ValueError, match="batch_size must be an int > 0"):
        ResumableBatchSampler(ResumableDistributedSampler(10), 0)
