"""The loop's client state across world sizes (moevit.train.state.reshard_client_states): usage sums are
kept, per-rank copies start from old rank q mod W."""

import torch

from moevit.train.state import reshard_client_states
from moevit.train.usage_plots import ExpertUsage


def rank_state(rank: int) -> dict:
    usage = ExpertUsage(["a", "b"], ema_decay=0.5)
    usage.add({"blocks.1.mlp": {"a": torch.tensor([1, rank, 3]), "b": torch.tensor([0, 2, 2 * rank])}})
    return {"step": 4, "rng": {"rank": rank}, "usage": usage.state_dict()}


def test_usage_sums_are_kept_and_rng_follows_rank_modulo():
    old = [rank_state(0), rank_state(1)]
    for new_world in (1, 3):
        new, notes = reshard_client_states(old, new_world)
        assert [state["rng"]["rank"] for state in new] == [q % 2 for q in range(new_world)]
        assert any("RNG" in note for note in notes)
        counts = torch.tensor([state["usage"]["counts"]["blocks.1.mlp"] for state in new]).sum(0)
        assert counts.tolist() == [[2, 1, 6], [0, 4, 2]]
        average = torch.tensor([state["usage"]["ema"]["rows"][0] for state in new]).sum(0)
        assert average.tolist() == [[2.0, 1.0, 6.0], [0.0, 4.0, 2.0]]
        assert all(state["usage"]["ema"]["seen"] == [True, True] for state in new)
