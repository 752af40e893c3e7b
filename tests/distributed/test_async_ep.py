"""Async EPLB (the default) with expert parallelism over 2 and 4 gloo ranks: forward steps with
all-to-all dispatch keep running while the worker threads move weights through torch_gloo; every
step's output equals the single-process unwrapped model; the end state equals the sync wrapper's."""

from __future__ import annotations

import copy

import moe_models as mm
import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from eplb import EPLBConfig, EPLBWrapper

pytestmark = pytest.mark.distributed


def _async_ep(rank, world_size, zero_rank):
    group = dist.group.WORLD
    reference = mm.build_reference_model(num_layers=3)
    results = {}
    for use_async in (True, False):
        config = EPLBConfig(num_redundant_experts=4, use_async=use_async, step_interval=10_000)
        wrapper = EPLBWrapper(copy.deepcopy(reference), config, ep_group=group)
        with torch.no_grad():
            for seed in range(3):
                wrapper(mm.hidden_batch(10 * seed + rank, batch=1, length=6 + 3 * rank))
            old = wrapper.placement
            wrapper.rebalance()
            steps_in_flight = 0
            step = 0
            while wrapper.async_in_flight:
                length = 0 if (rank == zero_rank and step % 2) else 4 + rank
                x = mm.hidden_batch(500 + 10 * step + rank, batch=1, length=length)
                torch.testing.assert_close(wrapper(x), reference(x))
                steps_in_flight += 1
                step += 1
            x = mm.hidden_batch(999 + rank, batch=1, length=7)
            torch.testing.assert_close(wrapper(x), reference(x))
        slots = [{n: t.clone() for n, t in layer.slot_tensors().items()} for layer in wrapper.eplb_layers]
        results[use_async] = {
            "steps_in_flight": steps_in_flight,
            "placement": wrapper.placement.phy2log.clone(),
            "moved": not wrapper.placement.equals(old),
            "slots": slots,
            "bytes": wrapper.stats()["last_rebalance_bytes_moved"],
        }
        wrapper.close()
    a, s = results[True], results[False]
    same_slots = all(torch.equal(x[n], y[n]) for x, y in zip(a["slots"], s["slots"]) for n in x)
    return {
        "steps_in_flight": a["steps_in_flight"], "moved": a["moved"], "same_placement":
        torch.equal(a["placement"], s["placement"]), "same_slots": same_slots, "bytes": (a["bytes"], s["bytes"]),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_async_ep_outputs_equal_unwrapped_after_every_step(world_size):
    outs = run_ranks(_async_ep, world_size, world_size - 1, timeout=300)
    for o in outs:
        assert o["moved"] and o["same_placement"] and o["same_slots"]
        assert o["steps_in_flight"] >= 3, "at most one of the 3 layers is committed per step"
        assert o["bytes"][0] == o["bytes"][1] > 0
    assert len({o["steps_in_flight"] for o in outs}) == 1
