"""Shard directories as a training and evaluation source (data.storage: shards): the shard-block sample
stream (ranks x workers disjoint and complete, padded tail), exact resume with any worker count, corrupt
members skipped and counted, evaluation equal to the folder reader's, and bad shard dirs refused."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import yaml
from pycocotools.coco import COCO

from moevit.cli import main as moevit_main
from moevit.config import Config, build_config
from moevit.data.build import build_dataset
from moevit.data.collate import collate_for_task
from moevit.data.multitask import MultiTaskLoader, reshard_loader_states
from moevit.data.sampler import (
    SHARDS_PER_WINDOW,
    ResumableDistributedSampler,
    ShardOrderSampler,
    reshard_sampler_state,
)
from moevit.data.schedule import TaskSchedule
from moevit.data.seeding import derive_seed
from moevit.data.shards import write_shards
from moevit.data.shards.indexed import IndexedShards
from moevit.data.shards.layout import decode_key
from moevit.data.synth import write_synthetic_datasets
from moevit.data.synth.spec import ADE20K_CLASSES, COCO_CATEGORY_IDS, IMAGENET_CLASSES

FORMATS = {"imagenet": "classification", "coco": "detection", "ade20k": "segmentation"}
NUM_CLASSES = {
    "imagenet": len(IMAGENET_CLASSES),
    "coco": len(COCO_CATEGORY_IDS),
    "ade20k": len(ADE20K_CLASSES),
}
# The tiny splits (160 / 48 / 48 train, 80 / 24 / 24 val) end in a short shard; ImageNet train in 54
# shards, several windows of SHARDS_PER_WINDOW.
SHARD_SIZE = 3


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(folder root, shard root) of the tiny synthetic datasets: shards/{dataset}/{train,val}."""
    base = tmp_path_factory.mktemp("shard_training")
    write_synthetic_datasets(base / "synth", size="tiny")
    for dataset in FORMATS:
        for split in ("train", "val"):
            write_shards(
                dataset, base / "synth" / dataset, split, base / "shards" / dataset / split, SHARD_SIZE
            )
    return base / "synth", base / "shards"


def config(root, storage: str, image_size: int = 32, batch_size: int = 4, **train) -> Config:
    tasks = {
        name: {
            "type": task_type,
            "num_classes": NUM_CLASSES[name],
            "data": {
                "format": name,
                "root": str(root / name),
                "storage": storage,
                "image_size": image_size,
                "batch_size": batch_size,
            },
        }
        for name, task_type in FORMATS.items()
    }
    return build_config(
        Config, {"model": {"name": "moevit_debug"}, "tasks": tasks, "train": {"num_workers": 0, **train}}
    )


def shard_loader(cfg: Config, tasks, rank=0, world_size=1, num_workers=0) -> MultiTaskLoader:
    return MultiTaskLoader(
        {t: build_dataset(FORMATS[t], cfg.tasks[t].data, train=True) for t in tasks},
        {t: cfg.tasks[t].data.batch_size for t in tasks},
        {t: collate_for_task(FORMATS[t]) for t in tasks},
        TaskSchedule(tuple(tasks), "all", seed=0),
        rank=rank,
        world_size=world_size,
        seed=3,
        num_workers=num_workers,
    )


def test_an_epoch_is_one_shard_permutation_split_in_equal_contiguous_rank_blocks():
    sizes = (5, 5, 3, 4)  # 17 samples: two ranks of 9, the 18th repeats the epoch's first sample
    ranks = [ShardOrderSampler(sizes, rank, 2, seed=9, shards_per_window=2) for rank in range(2)]
    order = ranks[0].epoch_order(4)
    assert sorted(order.tolist()) == list(range(17))
    shard_of = np.repeat(range(4), sizes)[order]
    # Two windows of two shards each: the first window's samples, then the second's, each window mixed.
    splits = [k for k in range(1, 17) if set(shard_of[:k]).isdisjoint(shard_of[k:])]
    assert len(splits) == 1 and len(set(shard_of[: splits[0]])) == 2
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) > 3  # shards interleave within a window
    blocks = [sampler.epoch_indices(4).tolist() for sampler in ranks]
    assert [len(block) for block in blocks] == [9, 9]
    assert blocks[0] + blocks[1] == order.tolist() + order[:1].tolist()
    positions = [[pair[1] for _, pair in zip(range(9), sampler.iter_with_positions())] for sampler in ranks]
    assert positions == [list(range(9)), list(range(9, 18))]  # the epoch's global order, whoever reads
    assert ranks[0].epoch_order(5).tolist() != order.tolist()
    unshuffled = ShardOrderSampler(sizes, 1, 2, shuffle=False)
    assert unshuffled.epoch_indices(0).tolist() == [*range(9, 17), 0]


def test_two_ranks_of_two_workers_read_disjoint_samples_and_together_all(roots):
    cfg = config(roots[1], "shards", batch_size=8)
    per_rank = []
    for rank in range(2):
        loader = shard_loader(cfg, ["imagenet"], rank=rank, world_size=2, num_workers=2)
        keys = [key for _, plan in zip(range(10), loader) for _, batch in plan for key in batch["keys"]]
        loader.close()
        per_rank.append(keys)  # 10 batches of 8: one epoch of 160 over 2 ranks
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(len(set(keys)) == 80 for keys in per_rank)
    shards = IndexedShards(roots[1] / "imagenet" / "train", "imagenet")
    shard_of = {decode_key(shards.raw_sample(i)["__key__"]): shards.locate(i)[0] for i in range(len(shards))}
    assert len(shard_of) == 160 and set(per_rank[0]) | set(per_rank[1]) == set(shard_of)
    # Contiguous blocks of a shard permutation: the ranks share at most the window at the block edge.
    rank_shards = [{shard_of[key] for key in keys} for keys in per_rank]
    assert len(rank_shards[0] & rank_shards[1]) <= SHARDS_PER_WINDOW < len(set(shard_of.values())) / 2


def _steps(loader: MultiTaskLoader, count: int) -> list:
    return [
        (task, batch["keys"], batch["images"].clone(), batch.get("labels"))
        for _, plan in zip(range(count), loader)
        for task, batch in plan
    ]


def _assert_same(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (task_a, keys_a, images_a, labels_a), (task_b, keys_b, images_b, labels_b) in zip(first, second):
        assert (task_a, keys_a) == (task_b, keys_b)
        assert torch.equal(images_a, images_b)  # the same augmentation draws, whoever decoded the sample
        assert (labels_a is None) == (labels_b is None)
        if labels_a is not None:
            assert torch.equal(labels_a, labels_b)


@pytest.mark.parametrize(("workers_before", "workers_after"), [(2, 0), (0, 2)])
def test_resume_mid_epoch_replays_the_shard_stream_with_any_worker_count(
    roots, workers_before, workers_after
):
    cfg = config(roots[1], "shards")
    tasks = ["imagenet", "ade20k"]  # a mid-shard stop in both, then an epoch boundary (ade20k: 48 samples)
    straight = shard_loader(cfg, tasks, num_workers=workers_before)
    uninterrupted = _steps(straight, 14)
    straight.close()
    first = shard_loader(cfg, tasks, num_workers=workers_before)
    _steps(first, 5)
    state = copy.deepcopy(first.state_dict())
    first.close()
    assert state["tasks"]["imagenet"]["sampler"]["order"] == "shard_blocks"
    resumed = shard_loader(cfg, tasks, num_workers=workers_after)
    resumed.load_state_dict(state)
    _assert_same(_steps(resumed, 9), uninterrupted[2 * 5 :])
    resumed.close()


def test_a_corrupt_member_is_skipped_and_counted_and_a_truncated_shard_too(roots, tmp_path):
    folder, _ = roots
    # One ImageNet train image cut in half: copied into the shards as it is, skipped when read.
    victim = sorted((folder / "imagenet" / "train").rglob("*.JPEG"))[3]
    damaged_root = tmp_path / "imagenet"
    shutil.copytree(folder / "imagenet", damaged_root)
    damaged = damaged_root / victim.relative_to(folder / "imagenet")
    damaged.write_bytes(damaged.read_bytes()[:200])
    write_shards("imagenet", damaged_root, "train", tmp_path / "shards" / "train", shard_size=7)
    cfg = config(tmp_path / "shards", "shards")
    cfg.tasks["imagenet"].data.root = str(tmp_path / "shards")
    cfg.tasks["imagenet"].data.val_split = "train"  # read the damaged split deterministically
    dataset = build_dataset("classification", cfg.tasks["imagenet"].data, train=False)
    skipped = sum(dataset[index]["num_skipped"] for index in range(len(dataset)))
    assert skipped == 1 and dataset.num_skipped == 1
    # A shard cut short: the samples it no longer holds are corrupt, one by one, and counted.
    last = tmp_path / "shards" / "train" / "train-000022.tar"  # 160 = 22 x 7 + 6
    last.write_bytes(last.read_bytes()[: 3 * 1024])
    dataset = build_dataset("classification", cfg.tasks["imagenet"].data, train=False)
    loader = MultiTaskLoader(
        {"imagenet": dataset},
        {"imagenet": 160},
        {"imagenet": collate_for_task("classification")},
        TaskSchedule(("imagenet",), "all"),
        shuffle=False,
    )
    batch = next(loader).batches[0].batch
    assert loader.skipped_counts()["imagenet"] == batch["num_skipped"] >= 2


def test_shard_evaluation_equals_the_folder_readers(roots):
    from moevit.eval import evaluate
    from moevit.factory import build_model

    folder_cfg, shard_cfg = config(roots[0], "folder", batch_size=8), config(roots[1], "shards", batch_size=8)
    torch.manual_seed(0)
    model = build_model(folder_cfg)
    assert evaluate(model, shard_cfg) == evaluate(model, folder_cfg)


def test_eval_ranks_take_disjoint_contiguous_blocks_of_equal_length():
    from moevit.eval import padded_rank_indices

    sizes = (7, 7, 7, 3)
    shares = [padded_rank_indices(24, rank, 3, sizes) for rank in range(3)]
    assert shares == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    shares = [padded_rank_indices(24, rank, 5, sizes) for rank in range(5)]
    assert {len(share) for share in shares} == {5}
    assert sorted(set(sum(shares, []))) == list(range(24))  # the one padded sample repeats the first


class ShardSizesStandIn(torch.utils.data.Dataset):
    """What MultiTaskLoader reads of a shard directory to pick its sampler: a length and shard sizes."""

    def __init__(self, shard_sizes: tuple[int, ...]):
        self.shard_sizes = shard_sizes

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def __getitem__(self, index: int) -> dict:
        return {"id": index}


def test_resharding_a_mid_epoch_shard_state_restarts_at_the_next_epoch():
    sampler = ShardOrderSampler((7, 7, 7, 3), rank=0, world_size=2, seed=1)
    state, consumed, exact = reshard_sampler_state(sampler.state_at(12 + 5), 3)
    assert (state["epoch"], state["position"], state["world_size"], exact) == (2, 0, 3, False)
    target = ShardOrderSampler((7, 7, 7, 3), rank=2, world_size=3, seed=1)
    target.load_state_dict(state)  # a shard-order state with the new geometry loads
    assert consumed == 2 * 8
    state, consumed, exact = reshard_sampler_state(sampler.state_at(24), 3)
    assert (state["epoch"], state["position"], exact) == (2, 0, True)

    # What `moevit ckpt reshard` does to every rank's loader state: the note says where the stream resumes.
    def loader(rank: int, world_size: int) -> MultiTaskLoader:
        return MultiTaskLoader(
            {"coco": ShardSizesStandIn((7, 7, 7, 3))},
            {"coco": 1},
            None,
            TaskSchedule(("coco",), "all"),
            rank=rank,
            world_size=world_size,
        )

    saved = []
    for rank in range(2):
        old = loader(rank, 2)
        saved.append({"step": 17, "tasks": {"coco": {"samples_consumed": 17, "skipped": rank}}})
        saved[-1]["tasks"]["coco"]["sampler"] = old._samplers["coco"].state_at(17)
    states, notes = reshard_loader_states(saved, 3)
    assert notes == ["task coco: the sample stream resumes at the start of epoch 2"]
    assert [state["tasks"]["coco"]["skipped"] for state in states] == [1, 0, 0]
    resumed = loader(1, 3)
    resumed.load_state_dict(states[1])
    expected = ShardOrderSampler((7, 7, 7, 3), 1, 3, seed=derive_seed(0, "coco")).epoch_indices(2)[0]
    assert next(resumed).batches[0].batch["id"].tolist() == [expected]  # rank 1's block of epoch 2
    with pytest.raises(ValueError, match="order"):
        ResumableDistributedSampler(24, 0, 2, seed=1).load_state_dict(sampler.state_at(3))


@pytest.mark.parametrize("problem", ["missing", "empty", "other dataset"])
def test_a_bad_shard_dir_is_refused_before_training_naming_it(roots, tmp_path, capsys, problem):
    shard_root = tmp_path / "shards"
    shard_root.mkdir()
    for task in FORMATS:
        for split in ("train", "val"):
            (shard_root / task / split).parent.mkdir(exist_ok=True)
            (shard_root / task / split).symlink_to(roots[1] / task / split)
    bad = shard_root / "coco" / "train"
    bad.unlink()
    if problem == "empty":
        bad.mkdir()
    elif problem == "other dataset":
        bad.symlink_to(roots[1] / "imagenet" / "train")
    raw = {
        "model": {"name": "moevit_debug"},
        "tasks": {
            name: {
                "type": FORMATS[name],
                "num_classes": NUM_CLASSES[name],
                "data": {
                    "format": name,
                    "root": str(shard_root / name),
                    "storage": "shards",
                    "batch_size": 2,
                },
            }
            for name in FORMATS
        },
        "train": {"steps": 1, "num_workers": 0},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert moevit_main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("moevit: error:") and str(bad) in error, error
    assert not (tmp_path / "run").exists()  # refused before the run directory or any compute


def test_coco_shards_train_and_give_ground_truth_without_the_source_folder_or_json(roots, tmp_path):
    folder, _ = roots
    source = tmp_path / "coco"
    shutil.copytree(folder / "coco", source)
    for split in ("train", "val"):
        write_shards("coco", source, split, tmp_path / "shards" / split, SHARD_SIZE)
    shutil.rmtree(source)  # boxes, labels and crowds travel in the samples' .json members
    cfg = config(tmp_path, "shards")
    cfg.tasks["coco"].data.root = str(tmp_path / "shards")
    batch = next(shard_loader(cfg, ["coco"])).batches[0].batch
    assert len(batch["targets"]) == 4
    val = build_dataset("detection", cfg.tasks["coco"].data, train=False)
    ground_truth = val.coco  # what COCOeval reads, rebuilt from the val shards
    original = COCO(str(folder / "coco" / "annotations" / "instances_val2017.json"))
    assert ground_truth.imgs == original.imgs and ground_truth.anns == original.anns
    assert sorted(ground_truth.getCatIds()) == sorted(original.getCatIds())
