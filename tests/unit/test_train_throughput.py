"""Speed fields (moevit.train.throughput): per-task images/s, step time, data-wait share, ETA and MFU per window."""

import pytest

from moevit.train.throughput import ETA_WINDOW, Throughput, format_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (42.4, "42s"),
        (307, "5m07s"),
        (2 * 3600 + 5 * 60 + 9, "2h05m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_window_gives_per_task_rates_step_time_and_the_data_wait_share():
    speed = Throughput(total_steps=10)
    speed.add(seconds=1.0, data_wait=0.25, task_images={"a": 16, "b": 0})
    speed.add(seconds=3.0, data_wait=0.75, task_images={"a": 16, "b": 8})
    per_task, fields = speed.record(step=2)
    assert per_task == {"a": {"images_per_second": 8.0}, "b": {"images_per_second": 2.0}}
    assert fields["step_seconds"] == 2.0
    assert fields["data_wait_share"] == pytest.approx(0.25)
    assert fields["eta_seconds"] == pytest.approx(8 * 2.0)
    assert "mfu" not in fields and "model_tflops_per_device" not in fields  # no FLOPs given
    speed.add(seconds=0.5, data_wait=0.0, task_images={"a": 1})
    per_task, fields = speed.record(step=3)  # a new window
    assert per_task == {"a": {"images_per_second": 2.0}} and fields["step_seconds"] == 0.5


def test_the_data_wait_share_stays_in_the_unit_interval():
    speed = Throughput(total_steps=4)
    speed.add(seconds=1.0, data_wait=1.0 + 1e-12, task_images={"a": 1})  # two clock reads a hair apart
    assert speed.record(1)[1]["data_wait_share"] == 1.0
    speed.add(seconds=1.0, data_wait=0.0, task_images={"a": 1})
    assert speed.record(2)[1]["data_wait_share"] == 0.0


def test_eta_is_the_remaining_steps_at_the_recent_mean_step_time():
    speed = Throughput(total_steps=1000)
    assert speed.eta_seconds(0) == 0.0  # nothing measured yet
    for _ in range(ETA_WINDOW):
        speed.add(seconds=1.0, data_wait=0.0, task_images={})
    assert speed.eta_seconds(ETA_WINDOW) == pytest.approx(1000 - ETA_WINDOW)
    for _ in range(ETA_WINDOW):  # the run slowed down: only the recent steps count
        speed.add(seconds=3.0, data_wait=0.0, task_images={})
    assert speed.eta_seconds(2 * ETA_WINDOW) == pytest.approx(3.0 * (1000 - 2 * ETA_WINDOW))
    assert speed.eta_seconds(1000) == 0.0


def test_mfu_from_the_window_flops_over_the_devices_peak():
    # 2 ranks; task a: 2 GFLOPs forward per image, 100 images in 1.5 s -> 3 x 200 GFLOPs = 6e11 FLOPs.
    speed = Throughput(total_steps=10, world_size=2, gflops_per_image={"a": 2.0, "b": 5.0}, peak_tflops=0.5)
    speed.add(seconds=0.5, data_wait=0.0, task_images={"a": 40, "b": 0})
    speed.add(seconds=1.0, data_wait=0.0, task_images={"a": 60, "b": 0})
    fields = speed.record(2)[1]
    assert fields["model_tflops_per_device"] == pytest.approx(6e11 / (1.5 * 2) / 1e12)
    assert fields["mfu"] == pytest.approx(6e11 / (1.5 * 2 * 0.5e12))
    without_peak = Throughput(total_steps=10, gflops_per_image={"a": 2.0})
    without_peak.add(seconds=1.0, data_wait=0.0, task_images={"a": 1})
    fields = without_peak.record(1)[1]
    assert "mfu" not in fields and fields["model_tflops_per_device"] == pytest.approx(6e9 / 1e12)
