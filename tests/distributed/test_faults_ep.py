"""Faults with several gloo ranks: wrap-time failures that every rank raises together, and copies
of a model wrapped over several ranks refused with a clear `EPLBError`."""

from __future__ import annotations

import copy
import os
import pickle

import moe_models as mm
import pytest
import torch.distributed as dist
from harness import spawn_ranks

from eplb import EPLBConfig, EPLBError, EPLBWrapper

pytestmark = pytest.mark.distributed


def _config(**kw) -> EPLBConfig:
    return EPLBConfig(**{"num_redundant_experts": 4, "step_interval": 10_000, "async_timeout_s": 5.0, **kw})


def _wrap_with_leftover_chunks(rank, world_size, folder):
    path = os.path.join(folder, "run.npz")
    if rank == 0:
        os.makedirs(path + ".chunks", exist_ok=True)  # an interrupted recording left this
    dist.barrier()
    try:
        EPLBWrapper(mm.build_reference_model(), _config(), ep_group=dist.group.WORLD, record_trace=path)
    except EPLBError as exc:
        return str(exc)
    return "wrapped"


def test_a_wrap_time_failure_on_one_rank_raises_on_every_rank(tmp_path):
    results = spawn_ranks(_wrap_with_leftover_chunks, 2, str(tmp_path), timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]
    own, peer = results[0].value, results[1].value
    assert "already exists (an interrupted recording?)" in own
    assert peer.startswith("rank 0 failed:") and "already exists" in peer


def _copy_refused(rank, world_size):
    wrapper = EPLBWrapper(mm.build_reference_model(), _config(), ep_group=dist.group.WORLD)
    messages = []
    for how in (copy.deepcopy, pickle.dumps):
        for obj in (wrapper.module, wrapper):
            try:
                how(obj)
            except EPLBError as exc:
                messages.append(str(exc))
    wrapper.close()
    return messages


def test_copying_a_model_wrapped_over_several_ranks_is_refused_with_the_way_out():
    results = spawn_ranks(_copy_refused, 2, timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert len(r.value) == 4
        assert all("over 2 expert-parallel ranks cannot be copied" in m and "unwrap()" in m for m in r.value)
