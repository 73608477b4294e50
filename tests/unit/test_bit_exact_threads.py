"""The `bit_exact` marker (tests/conftest.py) runs a test at one thread and at torch's default count, and
on both expert paths, whether or not the test names the parameters."""

from __future__ import annotations

import pytest
import torch

from moevit.layers import experts


@pytest.mark.bit_exact
def test_a_bit_exact_test_runs_at_the_thread_count_it_is_given(torch_threads, expert_path, request):
    assert torch.get_num_threads() == torch_threads
    assert experts.resolve_expert_impl("auto", torch.device("cpu")) == expert_path
    assert request.node.name.endswith(f"[threads{torch_threads}-{expert_path}]")


@pytest.mark.bit_exact
def test_a_bit_exact_test_that_names_no_parameter_runs_every_variant(request):
    params = request.node.callspec.params
    assert torch.get_num_threads() == params["torch_threads"]
    assert experts.resolve_expert_impl("auto", torch.device("cpu")) == params["expert_path"]


def test_other_tests_run_at_one_thread_on_the_cpu_default_path():
    assert torch.get_num_threads() == 1
    assert experts.resolve_expert_impl("auto", torch.device("cpu")) == "loop"
