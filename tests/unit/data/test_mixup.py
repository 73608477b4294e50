"""Mixup/CutMix of training batches: timm's `Mixup` as is, seeded by the batch's first stream position, so
the mixed batches are the same with 0, 1 and 2 workers and after a resume; evaluation is never mixed."""

from __future__ import annotations

import pytest
import torch
from timm.data.mixup import Mixup, mixup_target
from timm.loss import SoftTargetCrossEntropy

from moevit.config import build_config
from moevit.config.schema import Config, ImageNetTransforms
from moevit.data.collate import collate_classification, collate_for_task
from moevit.data.mixup import MixupCollate
from moevit.data.seeding import STREAM_POSITION, SeededSamples, derive_seed, seeded_rngs
from moevit.train.loader import build_train_loader

MIXING = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1}
# and every per-sample random step of timm's recipe, drawn in the workers too
RECIPE = {
    **MIXING,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.5,
    "re_mode": "pixel",
    "interpolation": "bicubic",
}
NUM_CLASSES = 10


def _samples(first_position: int, batch_size: int = 4, size: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(first_position)
    return [
        {
            "image": torch.rand(3, size, size, generator=generator),
            "label": (first_position + offset) % NUM_CLASSES,
            "key": f"k{offset}",
            STREAM_POSITION: first_position + offset,
        }
        for offset in range(batch_size)
    ]


def test_the_batch_is_timms_mixup_under_the_seed_of_its_first_position():
    settings = ImageNetTransforms(**MIXING)
    collate = MixupCollate(collate_classification, settings, NUM_CLASSES, seed=11)
    reference = Mixup(
        mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
        num_classes=NUM_CLASSES,
    )  # fmt: skip
    lams = set()
    for first in (0, 4, 8, 12, 16, 20):
        got = collate(_samples(first))
        plain = collate_classification(_samples(first))
        with seeded_rngs(derive_seed(11, first)):
            images, targets = reference(plain["images"], plain["labels"])
        assert torch.equal(got["images"], images) and torch.equal(got["labels"], targets)
        assert got["labels"].shape == (4, NUM_CLASSES) and got["keys"] == ["k0", "k1", "k2", "k3"]
        lams.add(round(float(got["labels"].max()), 4))
    assert len(lams) > 1  # each batch draws its own lambda


def test_smoothing_alone_gives_timms_smoothed_one_hot_targets():
    collate = collate_for_task("classification", ImageNetTransforms(label_smoothing=0.2), NUM_CLASSES, seed=0)
    samples = _samples(0)
    batch = collate(samples)
    plain = collate_classification(samples)
    assert torch.equal(batch["images"], plain["images"])  # no mixing
    assert torch.equal(batch["labels"], mixup_target(plain["labels"], NUM_CLASSES, 1.0, 0.2))
    assert batch["labels"][0, 0].item() == pytest.approx(0.8 + 0.02)


def test_plain_settings_and_evaluation_keep_hard_labels():
    assert collate_for_task("classification", ImageNetTransforms(), NUM_CLASSES) is collate_classification
    assert collate_for_task("classification") is collate_classification  # the eval loaders' call


def test_mixing_refuses_odd_batches_and_unpositioned_samples():
    collate = MixupCollate(collate_classification, ImageNetTransforms(**MIXING), NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match="even batch, got 3"):
        collate(_samples(0, batch_size=3))
    unpositioned = [{k: v for k, v in sample.items() if k != STREAM_POSITION} for sample in _samples(0)]
    with pytest.raises(ValueError, match="stream_position.*SeededSamples"):
        collate(unpositioned)


def test_seeded_samples_stamp_their_stream_position():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return {"index": index}

    assert SeededSamples(Dicts(), seed=1)[(2, 17)] == {"index": 2, STREAM_POSITION: 17}


def _loader(tiny_config, synth_root, num_workers):
    data = tiny_config(
        synth_root,
        datasets=("imagenet",),
        tasks={"imagenet": {"data": {"transforms": RECIPE}}},
        train={"num_workers": num_workers},
    )
    return build_train_loader(build_config(Config, data), 0, 1)


def _batches(loader, steps):
    return [
        (batch["images"].clone(), batch["labels"].clone()) for _ in range(steps) for _, batch in next(loader)
    ]


def _same(got, expected) -> bool:
    return all(
        torch.equal(images, other_images) and torch.equal(labels, other_labels)
        for (images, labels), (other_images, other_labels) in zip(got, expected, strict=True)
    )


def test_mixed_batches_are_the_same_with_0_1_and_2_workers_and_after_a_resume(tiny_config, synth_root):
    reference = _batches(_loader(tiny_config, synth_root, 0), 4)
    labels = torch.stack([labels for _, labels in reference])
    assert labels.shape == (4, 8, NUM_CLASSES)
    # mixed: some rows hold two classes above the smoothing floor (0.1 / 10)
    assert ((labels > 0.011).sum(dim=-1) == 2).any()
    for workers in (1, 2):
        assert _same(_batches(_loader(tiny_config, synth_root, workers), 4), reference), workers
    first = _loader(tiny_config, synth_root, 2)
    _batches(first, 2)
    resumed = _loader(tiny_config, synth_root, 1)
    resumed.load_state_dict(first.state_dict())
    assert _same(_batches(resumed, 2), reference[2:])


def test_a_mixed_batch_trains_the_model_built_from_the_config(tiny_config, synth_root):
    from moevit.factory import build_model

    torch.manual_seed(0)
    cfg = build_config(
        Config,
        tiny_config(synth_root, datasets=("imagenet",), tasks={"imagenet": {"data": {"transforms": RECIPE}}}),
    )
    (task, batch), *_ = next(build_train_loader(cfg, 0, 1))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (8, NUM_CLASSES)
    model = build_model(cfg)
    loss = model(task, batch).losses["loss"]
    loss.backward()
    logits = model.predict(task, batch)
    assert torch.allclose(loss, SoftTargetCrossEntropy()(logits, batch["labels"]), atol=1e-5)
    assert model.heads[task].fc.weight.grad.abs().sum() > 0
