"""Mixup / CutMix and label smoothing of classification training batches: timm's `Mixup`, used as is.

timm's `Mixup` (mode "batch") draws one mixing decision per batch from NumPy's global generator
(whether to mix, mixup or cutmix, lambda, the cutmix box) and mixes image i with image B-1-i. It runs
here, in the collate function, so it happens in the DataLoader worker like the rest of the
augmentation. For exact resume it is seeded like the per-sample transforms (moevit.data.seeding):
from the stream position of the batch's first sample, which `SeededSamples` stamps on each sample.
The batch's samples, and so that position, are fixed by the sampler in the main process, so the draw
is the same with any number of workers, on any rank, and after a resume.

The targets become (B, C) float distributions. Label smoothing is applied here only, as timm does:
`Mixup(label_smoothing=...)` smooths the mixed targets; with mixing off and smoothing on, timm's
`mixup_target` at lambda 1 gives the smoothed one-hot targets. The classification head computes the
soft-target cross-entropy of whatever targets it gets, and never smooths (moevit.heads.classification).
Evaluation batches are never mixed (the eval loaders use the plain collate functions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from timm.data.mixup import Mixup, mixup_target

from moevit.config.schema import ImageNetTransforms
from moevit.data.seeding import STREAM_POSITION, derive_seed, seeded_rngs


def needs_soft_targets(settings: ImageNetTransforms) -> bool:
    """Whether training batches carry (B, C) soft targets rather than hard labels."""
    return settings.mixes or settings.label_smoothing > 0


class MixupCollate:
    """`collate` (the plain classification collate), then timm's Mixup on images and labels.

    Args:
        collate: list of sample dicts -> {"images", "labels" (B,) int64, ...}.
        settings: the task's transform settings (mixup_alpha, cutmix_alpha, mixup_prob,
            mixup_switch_prob, label_smoothing).
        num_classes: width of the soft targets.
        seed: the task's mixing seed (run seed and task, derived); each batch is drawn under
            `derive_seed(seed, first stream position)`.

    Module-level and holding only picklable state, so DataLoader workers can run it.
    """

    def __init__(
        self,
        collate: Callable[[Sequence[dict]], dict],
        settings: ImageNetTransforms,
        num_classes: int,
        seed: int,
    ):
        if num_classes < 1:
            raise ValueError(f"MixupCollate: num_classes must be >= 1, got {num_classes}")
        self.collate, self.num_classes, self.seed = collate, num_classes, seed
        self.label_smoothing = settings.label_smoothing
        self.mixup = (
            Mixup(
                mixup_alpha=settings.mixup_alpha,
                cutmix_alpha=settings.cutmix_alpha,
                prob=settings.mixup_prob,
                switch_prob=settings.mixup_switch_prob,
                mode="batch",
                label_smoothing=settings.label_smoothing,
                num_classes=num_classes,
            )
            if settings.mixes
            else None
        )

    def __call__(self, samples: Sequence[dict]) -> dict:
        batch = self.collate(samples)
        labels = batch["labels"]
        if self.mixup is None:  # smoothing only: nothing random
            batch["labels"] = mixup_target(labels, self.num_classes, 1.0, self.label_smoothing)
            return batch
        if len(samples) % 2:
            raise ValueError(
                f"MixupCollate: timm's batch mixing pairs image i with image B-1-i and needs an even "
                f"batch, got {len(samples)} samples"
            )
        if STREAM_POSITION not in samples[0]:
            raise ValueError(
                f"MixupCollate: samples carry no {STREAM_POSITION!r} to seed the batch's mixing from; "
                "read them through moevit.data.seeding.SeededSamples (as MultiTaskLoader does)"
            )
        with seeded_rngs(derive_seed(self.seed, int(samples[0][STREAM_POSITION]))):
            batch["images"], batch["labels"] = self.mixup(batch["images"], labels)
        return batch

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mixup={vars(self.mixup) if self.mixup else None}, "
            f"label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )
