"""FixedCapacityDispatcher over 1, 2 and 4 gloo ranks: every pair reaches the rank owning its slot
and comes back to its token (zero tokens on a rank, every token to one rank, a batch exactly at
capacity, padding ids), a batch above capacity is refused before anything is sent, and a wrapped
model using it (hash and round-robin replica choice, padding rows) equals the unwrapped model
before and after rebalances."""

from __future__ import annotations

import copy
import warnings

import moe_models as mm
import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.moe.dispatch import FixedCapacityDispatcher, TokenDispatchMeta

pytestmark = pytest.mark.distributed
TIMEOUT = 240.0
D, K, S, C = 6, 3, 4, 9


def _fake_experts(rank: int, x_ND, slots_NK, weights_NK, sentinel: int | None):
    """Row n -> sum over its pairs of weight * x_n * (global slot + 1); sentinel pairs skipped
    (with ``sentinel=None`` every pair is computed, as a module that cannot skip does)."""
    own_NK = slots_NK != sentinel if sentinel is not None else torch.ones_like(slots_NK, dtype=torch.bool)
    factor_N = torch.where(own_NK, weights_NK * (slots_NK + rank * S + 1), 0).sum(1)
    return x_ND * factor_N.unsqueeze(1).to(x_ND.dtype)


def _expected(x_TD, slots_TK, weights_TK):
    factor_T = torch.where(slots_TK >= 0, weights_TK * (slots_TK + 1), 0).sum(1)
    return x_TD * factor_T.unsqueeze(1)


def _case(rank: int, world_size: int, case: str, seed: int):
    """This rank's tokens: (x_TD, slots_TK, weights_TK) for one named case."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    P = S * world_size
    T = {"zero_here": 0 if rank == world_size - 1 else 5, "at_capacity": C}.get(case, 1 + (3 * rank + seed) % C)
    x_TD = torch.randn(T, D, generator=gen, dtype=torch.float64)
    weights_TK = torch.rand(T, K, generator=gen, dtype=torch.float64)
    if case == "one_rank_gets_all":
        slots_TK = torch.randint(0, S, (T, K), generator=gen)  # every slot on rank 0
    else:
        slots_TK = torch.randint(0, P, (T, K), generator=gen)
    if case in ("padding", "at_capacity"):
        slots_TK[torch.rand(T, K, generator=gen) < 0.3] = -1
        if T:
            slots_TK[0] = -1  # a token with no pair at all
    return x_TD, slots_TK, weights_TK


def _dispatch_round_trips(rank, world_size, cases):
    group = dist.group.WORLD if world_size > 1 else None
    dispatcher = FixedCapacityDispatcher(group, C)
    assert (dispatcher.num_ranks, dispatcher.rank) == (world_size, rank)
    for seed, case in enumerate(cases):
        for sentinel in (S, 0):
            x_TD, slots_TK, weights_TK = _case(rank, world_size, case, seed)
            x_ND, slots_NK, weights_NK, meta = dispatcher.dispatch_tokens(x_TD, slots_TK, weights_TK, S, sentinel)
            assert isinstance(meta, TokenDispatchMeta)
            assert x_ND.shape == (world_size * C, D) and slots_NK.shape == weights_NK.shape == (world_size * C, K)
            assert weights_NK.dtype == weights_TK.dtype
            assert bool(((slots_NK >= 0) & (slots_NK <= S)).all())
            # Pairs that are not this rank's carry weight 0 (so a module computing them adds nothing).
            if sentinel == S:
                assert bool((weights_NK[slots_NK == S] == 0).all())
            y_ND = _fake_experts(rank, x_ND, slots_NK, weights_NK, S if sentinel == S else None)
            y_TD = dispatcher.combine_tokens(y_ND, meta)
            assert y_TD.shape == x_TD.shape
            torch.testing.assert_close(y_TD, _expected(x_TD, slots_TK, weights_TK), msg=f"{case} {sentinel}")
    # One token over capacity is refused on the host, before any collective (so no rank hangs).
    with pytest.raises(EPLBError, match="max_tokens_per_rank is 9"):
        dispatcher.dispatch_tokens(torch.zeros(C + 1, D), torch.zeros(C + 1, K, dtype=torch.int64),
                                   torch.zeros(C + 1, K), S, S)
    return True


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_pair_reaches_its_slot_and_comes_back(world_size):
    cases = ["random", "zero_here", "one_rank_gets_all", "at_capacity", "padding"]
    assert run_ranks(_dispatch_round_trips, world_size, cases, timeout=TIMEOUT) == [True] * world_size


def _wrapped_equals_unwrapped(rank, world_size, kind, replica_choice):
    warnings.filterwarnings("ignore", category=UserWarning)
    group = dist.group.WORLD
    model = mm.build_reference_model() if kind == "moe" else mm.build_transformers(kind)
    reference = copy.deepcopy(model)
    config = EPLBConfig(
        num_redundant_experts=4, use_async=False, step_interval=10_000, policy=mm.register_shuffle_policy(),
        dispatcher="fixed_capacity", max_tokens_per_rank=24, replica_choice=replica_choice,
    )
    wrapper = EPLBWrapper(model, config, ep_group=group)
    assert all(isinstance(layer.dispatcher, FixedCapacityDispatcher) for layer in wrapper.eplb_layers)
    counted = []
    for round_ in range(3):
        length = 0 if (rank == world_size - 1 and round_ == 1) else 3 + 5 * rank + round_
        if kind == "moe":
            x = mm.hidden_batch(100 * round_ + rank, batch=1, length=length)
        else:
            x = mm.token_batch(100 * round_ + rank, batch=1, length=max(length, 1))
        with torch.no_grad():
            got, want = wrapper(x), reference(x)
        if kind != "moe":
            got, want = got.logits, want.logits
        torch.testing.assert_close(got, want)
        wrapper.rebalance()
    # Padding: only the first 3 rows of a batch of 8 are real.
    wrapper.tracker.reset()
    wrapper.set_valid_tokens(3)
    x = mm.hidden_batch(7 + rank, batch=1, length=8) if kind == "moe" else mm.token_batch(7 + rank, batch=1, length=8)
    with torch.no_grad():
        got, want = wrapper(x), reference(x[:, :3])
    if kind == "moe":
        assert torch.equal(got[:, 3:], x[:, 3:])  # residual stack: padding rows get a zero MoE output
    else:
        got, want = got.logits, want.logits  # causal attention: real rows never see padding rows
    torch.testing.assert_close(got[:, :3], want)
    counted.append(int(wrapper.tracker.window_load().sum()))
    wrapper.set_valid_tokens(None)
    return counted


@pytest.mark.parametrize(
    ("world_size", "kind", "replica_choice"),
    [(2, "moe", "hash"), (2, "qwen3_moe", "round_robin"), (4, "moe", "round_robin")],
)
def test_wrapped_model_with_fixed_capacity_dispatch_equals_the_unwrapped_model(world_size, kind, replica_choice):
    counted = run_ranks(_wrapped_equals_unwrapped, world_size, kind, replica_choice, timeout=TIMEOUT)
    # 3 real tokens, top-2, per layer: 6 pairs recorded per layer and rank.
    layers = 2
    assert counted == [[3 * mm.TOP_K * layers]] * world_size
