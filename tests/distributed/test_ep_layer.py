"""Expert parallelism over gloo ranks on the CPU: every rank wraps a copy of the same model, runs
its own batch (different sizes, one rank with zero tokens), and must get what the single-process
unwrapped model gives on the same tokens, before and after several rebalances. Bad input is
detected at wrap time on every rank, with the model untouched."""

from __future__ import annotations

import copy
import warnings

import moe_models as mm
import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.moe import find_moe_layers

pytestmark = pytest.mark.distributed
TIMEOUT = 300.0


def _build(kind: str):
    if kind == "moe":
        return mm.build_reference_model()
    if kind == "module_list":
        return mm.build_module_list_model()
    return mm.build_transformers(kind)


def _batch(kind: str, rank: int, round_: int, zero_rank: int):
    seed = 1000 * round_ + rank
    if kind in ("moe", "module_list"):
        # Different token counts per rank; zero_rank sends none.
        return mm.hidden_batch(seed, batch=1, length=0 if rank == zero_rank else 5 + 7 * rank)
    # transformers models cannot run an empty sequence themselves: the smallest batch is one token.
    return mm.token_batch(seed, batch=1, length=1 if rank == zero_rank else 4 + 3 * rank)


def _output(kind, model, x):
    out = model(x)
    return out if kind in ("moe", "module_list") else out.logits


def _wrapped_equals_single_process(rank, world_size, kinds, zero_rank):
    warnings.filterwarnings("ignore", category=UserWarning)
    group = dist.group.WORLD
    summary = {}
    for kind in kinds:
        model = _build(kind)  # the same seed on every rank: the same model
        reference = copy.deepcopy(model)
        logical = [
            {n: getattr(spec.experts, n).detach().clone() for n in spec.expert_tensors}
            for spec in find_moe_layers(copy.deepcopy(model))
        ]
        config = EPLBConfig(
            num_redundant_experts=4,
            use_async=False,
            step_interval=10_000,
            policy=mm.register_shuffle_policy(),
        )
        wrapper = EPLBWrapper(model, config, ep_group=group)
        S = 12 // world_size
        moved = 0
        for round_ in range(4):
            x = _batch(kind, rank, round_, zero_rank)
            with torch.no_grad():
                torch.testing.assert_close(_output(kind, wrapper, x), _output(kind, reference, x))
            for layer in wrapper.eplb_layers:
                row = wrapper.placement.phy2log[layer.layer_index]
                own = row[rank * S : (rank + 1) * S]
                for name, slots in layer.slot_tensors().items():
                    assert slots.shape[0] == S  # rank r keeps only its own slots
                    assert torch.equal(slots, logical[layer.layer_index][name][own])
            if round_ < 3:
                report = wrapper.rebalance()
                moved += report.network_transfers
        placements = [None] * world_size
        dist.all_gather_object(placements, wrapper.placement.phy2log.tolist(), group=group)
        assert all(p == placements[0] for p in placements)
        restored = wrapper.unwrap()  # all-gathers the primaries
        ours, theirs = restored.state_dict(), reference.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        summary[kind] = moved
    return summary


@pytest.mark.parametrize(
    ("world_size", "kinds"),
    [(2, ("moe", "module_list", "mixtral")), (4, ("moe", "qwen3_moe"))],
    ids=["2-ranks", "4-ranks"],
)
def test_ep_outputs_equal_the_single_process_model(world_size, kinds):
    results = run_ranks(_wrapped_equals_single_process, world_size, kinds, world_size - 1, timeout=TIMEOUT)
    # Weights really crossed the network, and every rank reports the same counts.
    assert all(r == results[0] for r in results)
    assert all(moved > 0 for moved in results[0].values())


def _bad_inputs_are_refused_on_every_rank(rank, world_size):
    warnings.filterwarnings("ignore", category=UserWarning)
    group = dist.group.WORLD
    errors = []

    def attempt(model, config, **kwargs):
        before = copy.deepcopy(model.state_dict())
        try:
            EPLBWrapper(model, config, ep_group=group, **kwargs)
        except EPLBError as exc:
            errors.append(str(exc))
        else:
            errors.append(None)
        state = model.state_dict()
        assert all(torch.equal(state[k], before[k]) for k in before) and not model._forward_hooks

    base = dict(use_async=False, num_redundant_experts=4)
    # Ranks disagree on the config.
    attempt(mm.build_reference_model(), EPLBConfig(**base, window_size=10 + rank))
    # Ranks disagree on E.
    attempt(mm.build_reference_model(num_experts=8 if rank == 0 else 10, top_k=2), EPLBConfig(**base))
    # num_physical (9) is not a multiple of the group size (2).
    attempt(mm.build_reference_model(), EPLBConfig(use_async=False, num_redundant_experts=1))
    # One rank fails locally (its model has no MoE layer): the others must not hang.
    model = mm.build_reference_model() if rank else torch.nn.Sequential(torch.nn.Linear(2, 2))
    attempt(model, EPLBConfig(**base))
    # Training through the all-to-all is refused.
    wrapper = EPLBWrapper(mm.build_reference_model().train(), EPLBConfig(use_async=False), ep_group=group)
    try:
        wrapper(mm.hidden_batch(rank))
    except EPLBError as exc:
        errors.append(str(exc))
    return errors


def test_bad_input_is_refused_at_wrap_time_on_every_rank():
    results = run_ranks(_bad_inputs_are_refused_on_every_rank, 2, timeout=TIMEOUT)
    for errors in results:
        config_err, e_err, size_err, local_err, train_err = errors
        assert "rank 0 and rank 1 differ in config" in config_err
        assert "differ in num_logical" in e_err and "(8, 10)" in e_err
        assert (
            "num_physical (9) must be a multiple of num_ranks (2); set num_redundant_experts to 2" in size_err
        )
        assert "no MoE layer found" in local_err
        assert "training through expert parallelism (num_ranks=2) is not supported" in train_err
