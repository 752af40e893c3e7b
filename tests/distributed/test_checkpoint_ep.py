"""Real checkpoints over gloo ranks on the CPU: every rank builds the model on the meta device,
wraps it, and loads a sharded safetensors checkpoint reading only the expert rows its slots hold.
Each rank's expert memory is S/E of the model's experts; outputs equal the full model before and
after rebalances, and after a trainer's new weights are pushed into every replica. float8 experts
with per-expert scales move between ranks as bytes."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import moe_models as mm
import odd_experts as odd
import pytest
import torch
import torch.distributed as dist
from checkpoints import save_sharded, updated
from harness import run_ranks

from eplb import EPLBConfig, EPLBWrapper, meta_parameters
from eplb.moe import find_moe_layers

pytestmark = pytest.mark.distributed
TIMEOUT = 300.0
P = 12  # 8 logical experts + 4 redundant slots


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _check_outputs(wrapper, reference, rank, round_):
    x = mm.token_batch(100 * round_ + rank, batch=1, length=3 + 2 * rank)
    torch.testing.assert_close(_logits(wrapper, x), _logits(reference, x))


def _expected_reads(wrapper, full, rank, world_size, parts):
    """(rows, bytes) this rank must read: every dense tensor, and per layer and per-expert tensor
    the rows of the distinct experts its slots hold (a row stored as ``parts[name]`` tensors counts
    each)."""
    S = P // world_size
    expert_keys, rows, expert_bytes = set(), 0, 0
    names = {id(m): n for n, m in full.named_modules()}
    for spec, layer in zip(find_moe_layers(full), wrapper.eplb_layers):
        own = layer.placement_row()[rank * S : (rank + 1) * S]
        distinct = len(set(own.tolist()))
        for n in spec.expert_tensors:
            expert_keys.add(f"{names[id(spec.experts)]}.{n}")
            t = getattr(spec.experts, n)
            rows += distinct * parts.get(n, 1)
            expert_bytes += distinct * t[0].numel() * t.element_size()
    dense_bytes = sum(
        t.numel() * t.element_size() for k, t in full.state_dict().items() if k not in expert_keys
    )
    return rows, dense_bytes + expert_bytes


def _meta_model_loads_and_runs(rank, world_size, kind, folder, hub_format):
    warnings.filterwarnings("ignore", category=UserWarning)
    group = dist.group.WORLD
    full = mm.build_transformers(kind)  # the model the checkpoint holds (same seed on every rank)
    with meta_parameters():
        model = mm.build_transformers(kind)
    config = EPLBConfig(
        num_redundant_experts=P - mm.NUM_EXPERTS, use_async=False, step_interval=10_000,
        policy=mm.register_shuffle_policy(),
    )
    wrapper = EPLBWrapper(model, config, ep_group=group, device="cpu")
    S = P // world_size

    # Memory: only this rank's S slots per layer exist, and nothing is left on the meta device.
    slot_bytes = sum(
        t.numel() * t.element_size() for layer in wrapper.eplb_layers for t in layer.slot_tensors().values()
    )
    expert_bytes = sum(
        getattr(spec.experts, n).numel() * getattr(spec.experts, n).element_size()
        for spec in find_moe_layers(copy.deepcopy(full))
        for n in spec.expert_tensors
    )
    assert slot_bytes * mm.NUM_EXPERTS == expert_bytes * S
    assert not any(t.device.type == "meta" for t in wrapper.module.state_dict().values())

    # The reader touched only this rank's rows.
    report = wrapper.load_logical_state_dict(folder)
    # Per-expert checkpoints store gate_up_proj's row as two tensors (gate_proj, up_proj).
    parts = {"gate_up_proj": 2} if hub_format else {}
    rows, nbytes = _expected_reads(wrapper, full, rank, world_size, parts)
    assert (report.expert_rows_read, report.bytes_read) == (rows, nbytes)
    assert len(list(Path(folder).glob("*.safetensors"))) > 1  # the folder really is sharded
    full_rows = sum(len(layer.slot_tensors()) + len(parts) for layer in wrapper.eplb_layers) * mm.NUM_EXPERTS
    assert report.expert_rows_read <= full_rows * S // mm.NUM_EXPERTS

    for round_ in range(3):
        _check_outputs(wrapper, full, rank, round_)
        assert not wrapper.rebalance().skipped
    _check_outputs(wrapper, full, rank, 3)

    # A trainer pushes new logical weights (the same on every rank): every replica takes them.
    for version in (1, 2):
        full = updated(full, seed=version)
        wrapper.load_logical_state_dict(full.state_dict())
        _check_outputs(wrapper, full, rank, 10 + version)
        wrapper.rebalance()
        _check_outputs(wrapper, full, rank, 20 + version)
    restored = wrapper.unwrap()
    ours, theirs = restored.state_dict(), full.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    return report.expert_rows_read


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
@pytest.mark.parametrize(
    ("kind", "hub_format"), [("qwen3_moe", False), ("deepseek_v3", True)], ids=["qwen3_moe", "deepseek_v3-hub"]
)
def test_meta_model_loads_only_its_rows_and_equals_the_full_model(kind, hub_format, world_size, tmp_path):
    """Qwen3-MoE from stacked keys (``save_sharded``); DeepSeek-V3 as transformers' save_pretrained
    writes it (one key per expert and projection, sharded, with an index)."""
    model = mm.build_transformers(kind)
    if hub_format:
        model.save_pretrained(tmp_path, max_shard_size="100KB")
        folder = str(tmp_path)
    else:
        folder = save_sharded(model, tmp_path)
    rows = run_ranks(_meta_model_loads_and_runs, world_size, kind, folder, hub_format, timeout=TIMEOUT)
    # Each rank read a different share; together at most S rows per rank and tensor.
    assert len(rows) == world_size and all(r > 0 for r in rows)


def _float8_experts_move_as_bytes(rank, world_size):
    warnings.filterwarnings("ignore", category=UserWarning)
    model = odd.build_odd_model("float8")
    reference = copy.deepcopy(model)
    config = EPLBConfig(
        num_redundant_experts=4, use_async=False, step_interval=10_000, policy=mm.register_shuffle_policy()
    )
    wrapper = EPLBWrapper(model, config, ep_group=dist.group.WORLD)
    moved = 0
    for round_ in range(3):
        x = mm.hidden_batch(10 * round_ + rank, batch=1, length=6 + rank)
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x), reference(x))
        moved += wrapper.rebalance().network_transfers
    new = updated(reference, seed=4)
    wrapper.load_logical_state_dict(new.state_dict())
    x = mm.hidden_batch(99 + rank)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), new(x))
    restored = wrapper.unwrap()
    ours, theirs = restored.state_dict(), new.state_dict()
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in theirs)
    return moved


def test_float8_experts_with_scales_rebalance_over_gloo():
    moved = run_ranks(_float8_experts_move_as_bytes, 2, timeout=TIMEOUT)
    assert moved[0] == moved[1] > 0


def _load_during_async_rebalance(rank, world_size):
    warnings.filterwarnings("ignore", category=UserWarning)
    model = mm.build_reference_model()
    config = EPLBConfig(num_redundant_experts=4, use_async=True, step_interval=10_000)
    with EPLBWrapper(model, config, ep_group=dist.group.WORLD) as wrapper:
        with torch.no_grad():
            wrapper(mm.hidden_batch(rank))
        assert wrapper.rebalance() is None and wrapper.async_in_flight
        new = updated(mm.build_reference_model(), seed=7)
        report = wrapper.load_logical_state_dict(new.state_dict())
        assert not wrapper.async_in_flight
        x = mm.hidden_batch(50 + rank)
        with torch.no_grad():
            torch.testing.assert_close(wrapper(x), new(x))
        return report.in_flight, wrapper.stats()["num_rebalances"]


def test_load_waits_for_an_async_rebalance_in_flight_on_every_rank():
    assert run_ranks(_load_during_async_rebalance, 2, timeout=TIMEOUT) == [("waited", 1)] * 2
