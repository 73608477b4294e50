"""MoE block shapes resolved from MoEViT's argument forms (moevit.models.layer_specs)."""

import pytest

from moevit.models.layer_specs import MoEMlpSpec, moe_mlp_specs


def test_uniform_form_gives_every_block_the_same_shape():
    specs = moe_mlp_specs([1, 3], 8, 2, ["a", "b"], {"a": 4})
    assert specs == {1: MoEMlpSpec(8, 2, {"a": 4}), 3: MoEMlpSpec(8, 2, {"a": 4})}


def test_per_block_form_clamps_top_k_and_turns_one_expert_into_a_plain_mlp():
    specs = moe_mlp_specs([1, 3], {1: 3, 3: 1}, 2, ["a", "b"], {"a": {1: 2}})
    assert specs[1] == MoEMlpSpec(3, 2, {"a": 2})
    assert specs[3] == MoEMlpSpec(1, 1, {}, plain=True)  # a's restriction names block 1 only


@pytest.mark.parametrize(
    ("num_experts", "task_experts", "message"),
    [
        ({1: 2}, None, "num_experts names blocks"),
        ({1: 2, 3: 0}, None, "must be >= 1"),
        (4, {"c": 2}, "not tasks of the model"),
        (4, {"a": {2: 1}}, "names blocks"),
    ],
)
def test_forms_that_do_not_fit_the_model_are_refused(num_experts, task_experts, message):
    with pytest.raises(ValueError, match=message):
        moe_mlp_specs([1, 3], num_experts, 2, ["a", "b"], task_experts)
