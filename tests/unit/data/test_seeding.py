"""Augmentation seeded by the sample's stream position (moevit.data.seeding): the same augmented tensors
whatever the number of DataLoader workers, after a resume, and without touching the main process's RNG."""

import torch

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.data.seeding import SeededSamples, seeded_rngs
from moevit.train.loader import build_train_loader


def loader(tiny_config, synth_root, num_workers, rank=0, world_size=1):
    data = tiny_config(
        synth_root, datasets=("imagenet", "coco", "ade20k"), train={"num_workers": num_workers}
    )
    return build_train_loader(build_config(Config, data), rank, world_size)


def batches(multitask, steps):
    out = []
    for _ in range(steps):
        for task, batch in next(multitask):
            out.append((task, batch["images"].clone()))
    return out


def test_the_same_samples_are_augmented_alike_with_0_1_and_2_workers(tiny_config, synth_root):
    reference = batches(loader(tiny_config, synth_root, 0), 3)
    for workers in (1, 2):
        got = batches(loader(tiny_config, synth_root, workers), 3)
        assert [task for task, _ in got] == [task for task, _ in reference]
        for (task, images), (_, expected) in zip(got, reference):
            assert torch.equal(images, expected), (task, workers)


def test_a_resumed_loader_draws_what_the_uninterrupted_one_did(tiny_config, synth_root):
    straight = loader(tiny_config, synth_root, 1)
    expected = batches(straight, 4)[6:]  # steps 3 and 4 (three tasks a step)
    first = loader(tiny_config, synth_root, 2)
    batches(first, 2)
    resumed = loader(tiny_config, synth_root, 0)  # another worker count after the resume
    resumed.load_state_dict(first.state_dict())
    got = batches(resumed, 2)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected, strict=True))


def test_the_draw_follows_the_stream_position_not_the_index():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3)

    samples = SeededSamples(Noise(), seed=7)
    assert torch.equal(samples[(2, 10)], samples[(2, 10)])
    assert not torch.equal(samples[(2, 10)], samples[(2, 11)])  # the same index at another position
    assert torch.equal(
        samples[(1, 10)], samples[(2, 10)]
    )  # Noise ignores the index: the seed is the position


def test_main_process_rngs_are_left_as_they_were():
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with seeded_rngs(123):
        torch.rand(5), random.random(), np.random.rand()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


def test_ranks_read_disjoint_positions_of_one_stream():
    from moevit.data.sampler import ResumableDistributedSampler

    positions = []
    for rank in range(3):
        stream = ResumableDistributedSampler(10, rank, 3, seed=5).iter_with_positions()
        positions += [next(stream)[1] for _ in range(8)]  # beyond one epoch (4 per rank)
    assert sorted(positions) == list(range(24))
