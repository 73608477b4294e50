"""The `bit_exact` marker (tests/conftest.py) runs a test at one thread and at torch's default count."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.bit_exact
def test_a_bit_exact_test_runs_at_the_thread_count_it_is_given(torch_threads, request):
    assert torch.get_num_threads() == torch_threads
    assert request.node.name.endswith(f"[threads{torch_threads}]")


def test_other_tests_run_at_one_thread():
    assert torch.get_num_threads() == 1
