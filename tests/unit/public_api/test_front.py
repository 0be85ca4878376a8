"""The front runner: a stage calibrated cheaper than the inline threshold runs on the event loop,
any other call in a worker thread; answers are the same either way."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from private_core.model_store import load_back_stage
from private_core.runner import request_bytes_limit
from public_api.front import (
    FrontRunner,
    FrontStage,
    load_front_stages,
    message_limit,
    probe_inputs,
)
from public_api.settings import PublicSettings
from shared.validation import check_tensors
from tests.conftest import Deployment, DigitsFixture


class ThreadRecorder(torch.nn.Module):
    """Runs the wrapped stage and notes the thread of every call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.threads: list[str] = []

    def forward(self, *args: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.inner(*args)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1, thread_name_prefix="front-stage") as executor:
        yield executor


@pytest.fixture(scope="module")
def front_stages(deployment: Deployment) -> dict[str, FrontStage]:
    return load_front_stages(deployment.layout.public)


def _recorded(stage: FrontStage) -> tuple[FrontStage, ThreadRecorder]:
    recorder = ThreadRecorder(stage.module)
    return dataclasses.replace(stage, module=recorder), recorder


def _on_loop(recorder: ThreadRecorder) -> bool:
    return recorder.threads[-1] == threading.current_thread().name


def _in_pool(recorder: ThreadRecorder) -> bool:
    return recorder.threads[-1].startswith("front-stage")


async def test_a_cheap_stage_runs_on_the_loop_with_the_same_answers(
    pool: ThreadPoolExecutor, front_stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    stage, recorder = _recorded(front_stages["digits"])
    images = {"image": digits_model.data.test_x[:4]}
    uncalibrated = FrontRunner(pool, inline_below_s=1.0)
    in_pool = await uncalibrated.run(stage, images, rows=4)
    assert _in_pool(recorder)  # not calibrated: always the pool
    runner = FrontRunner(pool, inline_below_s=1.0)
    seconds = runner.calibrate(stage)
    assert 0 < seconds < 1.0 and runner.seconds_per_row("digits") == seconds
    inline = await runner.run(stage, images, rows=4)
    assert _on_loop(recorder)
    for name, value in in_pool.items():
        np.testing.assert_array_equal(value, inline[name])


async def test_calls_expected_over_the_threshold_stay_off_the_loop(
    pool: ThreadPoolExecutor, front_stages: dict[str, FrontStage], digits_model: DigitsFixture
) -> None:
    stage, recorder = _recorded(front_stages["digits"])
    image = {"image": digits_model.data.test_x[:1]}
    never = FrontRunner(pool, inline_below_s=0.0)
    never.calibrate(stage)
    await never.run(stage, image, rows=1)
    assert _in_pool(recorder)
    runner = FrontRunner(pool, inline_below_s=1.0)
    per_row = runner.calibrate(stage)
    await runner.run(stage, image, rows=1)
    assert _on_loop(recorder)
    await runner.run(stage, image, rows=int(1.0 / per_row) + 1)  # rows x cost over 1 s
    assert _in_pool(recorder)


def test_probe_inputs_are_valid_and_as_large_as_allowed(
    front_stages: dict[str, FrontStage],
) -> None:
    for stage in front_stages.values():
        inputs = probe_inputs(stage.manifest)
        sizes = check_tensors(stage.manifest.inputs, inputs)  # raises if invalid
        assert sizes["batch"] == 1
        for spec in stage.manifest.inputs:
            for dim in spec.shape[1:]:
                if not isinstance(dim, int):
                    assert sizes[dim.name] == dim.max


def test_the_send_limit_fits_what_the_private_tier_accepts(
    deployment: Deployment, front_stages: dict[str, FrontStage]
) -> None:
    backs = {
        name: load_back_stage(deployment.layout.private.model(name), deployment.provider)
        for name in front_stages
    }
    needed, model = request_bytes_limit(backs)
    settings = PublicSettings(
        tier_dir=deployment.layout.public.root, private_addresses=["x:1"], max_message_mb=4
    )
    assert model == "minilm" and needed > 4 * 1024 * 1024  # over the configured limit
    assert message_limit(settings, front_stages) == needed  # raised to what the tier accepts
    small = {"digits": front_stages["digits"]}
    assert message_limit(settings, small) == 4 * 1024 * 1024
