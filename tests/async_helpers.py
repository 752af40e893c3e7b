"""Helpers of the async-wrapper tests (tests/unit/test_wrapper_async.py, test_wrapper_lifecycle.py)."""

from __future__ import annotations

import threading
import time

import moe_models as mm
import torch

from eplb import EPLBConfig


def _config(**kw) -> EPLBConfig:
    return EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, **kw})


def _steps(wrapper, reference, seeds, dtype=None) -> None:
    """One forward per seed; every output equals the unwrapped model's."""
    with torch.no_grad():
        for seed in seeds:
            x = mm.hidden_batch(seed, dtype=dtype)
            torch.testing.assert_close(wrapper(x), reference(x))


def _layer_rows(wrapper) -> torch.Tensor:
    return torch.stack([layer.placement_row() for layer in wrapper.eplb_layers])


def _wait_planned(wrapper) -> None:
    job = wrapper._executor._job
    deadline = time.monotonic() + 30
    while job is not None and not job.planned and time.monotonic() < deadline:
        time.sleep(0.001)


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "eplb-async-rebalance"]

