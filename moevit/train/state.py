"""What a training checkpoint carries besides the engine's weights and optimizer: the loop's own state.

`TrainState` holds the stateful pieces of the loop (the multi-task loader, the loss balancer, the
expert-usage counters and the step's non-finite and MI bookkeeping) and is the one place that lists
the checkpoint's client-state keys (moevit.parallel.checkpoint saves them per rank as JSON). DeepSpeed
saves none of this; without it a resumed run would redraw samples, reweigh tasks and restart its RNG.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from moevit.config.schema import Config
from moevit.data.collate import pins_memory
from moevit.data.multitask import MultiTaskLoader, reshard_loader_states
from moevit.parallel.checkpoint import capture_rng_state, restore_rng_state
from moevit.parallel.env import DistributedEnv
from moevit.train.balancing import LossBalancer, build_balancer
from moevit.train.loader import build_train_loader
from moevit.train.step import MultiTaskStep
from moevit.train.usage_plots import ExpertUsage


@dataclass
class TrainState:
    loader: MultiTaskLoader
    balancer: LossBalancer
    usage: ExpertUsage
    train_step: MultiTaskStep

    def client_state(self, step: int) -> dict[str, Any]:
        """This rank's loop state after `step` (JSON-able), RNG streams included."""
        return {
            "step": step,
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "balancer": self.balancer.state_dict(),
            "usage": self.usage.state_dict(),
            "nonfinite": self.train_step.state_dict(),
            "task_expert_mass": self.train_step.task_expert_mass.state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Restores what `client_state` saved; returns the step it was saved after."""
        self.loader.load_state_dict(state["loader"])
        self.balancer.load_state_dict(state["balancer"])
        self.usage.load_state_dict(state["usage"])
        restore_rng_state(state["rng"])
        # Keys added later than the format's first version: absent from older checkpoints.
        if "nonfinite" in state:
            self.train_step.load_state_dict(state["nonfinite"])
        if "task_expert_mass" in state:
            self.train_step.task_expert_mass.load_state_dict(state["task_expert_mass"])
        return state["step"]


def build_train_state(train_cfg: Config, engine, env: DistributedEnv, device: torch.device) -> TrainState:
    """The loop's state for the tasks of `train_cfg` (moevit.config.schema.Config.training_view)."""
    tasks = list(train_cfg.tasks)
    loader = build_train_loader(train_cfg, env.rank, env.world_size, pin_memory=pins_memory(device))
    balancer = build_balancer(
        train_cfg.train.loss_balancing, {name: task.loss_weight for name, task in train_cfg.tasks.items()}
    )
    train_step = MultiTaskStep(
        engine,
        tasks,
        train_cfg.aux_loss,
        loader.expected_ratios(),
        env.world_size,
        device,
        max_bad_steps=train_cfg.train.max_bad_steps,
    )
    return TrainState(loader, balancer, ExpertUsage(tasks, train_cfg.train.usage_ema_decay), train_step)


def reshard_client_states(
    old: list[dict[str, Any]], new_world: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every old rank's client state rewritten for `new_world` ranks (`moevit ckpt reshard`), and notes
    on what could not be kept exactly.

    New rank q starts from old rank q mod W. The loader's sample streams move through the global stream
    (moevit.data.multitask.reshard_loader_states). Expert-usage counts and their average are per-rank
    shares of all-rank sums: rank 0 gets the totals, the others zeros, so the sums are kept. The step's
    bookkeeping and the MI estimate are the same on every rank. RNG streams are per rank and cannot be
    continued exactly on another world size.
    """
    notes = []
    if len(old) != new_world:
        notes.append(f"RNG streams: new rank q continues old rank q mod {len(old)}'s (not bit-exact)")
    new_states = [copy.deepcopy(old[rank % len(old)]) for rank in range(new_world)]
    if "loader" in old[0]:
        loaders, loader_notes = reshard_loader_states([state["loader"] for state in old], new_world)
        notes += loader_notes
        for state, loader in zip(new_states, loaders):
            state["loader"] = loader
    if "usage" in old[0]:
        totals = _summed_usage([state["usage"] for state in old])
        for rank, state in enumerate(new_states):
            state["usage"] = totals if rank == 0 else _zeroed_usage(totals)
    return new_states, notes


def _summed_usage(states: list[dict[str, Any]]) -> dict[str, Any]:
    total = copy.deepcopy(states[0])
    total["counts"] = {
        layer: torch.tensor([s["counts"][layer] for s in states]).sum(0).tolist() for layer in total["counts"]
    }
    if "ema" in total and total["ema"]["rows"]:
        total["ema"]["rows"] = [
            torch.tensor([s["ema"]["rows"][i] for s in states], dtype=torch.float32).sum(0).tolist()
            for i in range(len(total["ema"]["rows"]))
        ]
    return total


def _zeroed_usage(total: dict[str, Any]) -> dict[str, Any]:
    zeroed = copy.deepcopy(total)
    zeroed["counts"] = {
        layer: torch.zeros_like(torch.tensor(rows)).tolist() for layer, rows in total["counts"].items()
    }
    if "ema" in zeroed:
        zeroed["ema"]["rows"] = [
            torch.zeros(torch.tensor(rows).shape).tolist() for rows in total["ema"]["rows"]
        ]
    return zeroed
