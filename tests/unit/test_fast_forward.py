"""The forward paths of the EPLB layer on one process: the direct experts call, the fixed-capacity
dispatcher without a group, the pair path; padding (router ids of -1 and ``set_valid_tokens``);
hash and round-robin replica choice; the config fields that select them."""

from __future__ import annotations

import copy

import moe_models as mm
import pydantic
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb import EPLBConfig, EPLBError, EPLBWrapper
from eplb.moe import EPLBExperts, SwiGLUExperts
from eplb.moe.dispatch import FixedCapacityDispatcher, make_dispatcher
from eplb.tracker import LoadTracker

E, D, K = 8, 16, 2
ROW = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3, 7])  # expert 0: 3 replicas, 3 and 7: 2


def _experts(seed=0) -> SwiGLUExperts:
    torch.manual_seed(seed)
    return SwiGLUExperts(E, D, 24).eval()


def _layer(experts, *, dispatcher=None, replica_choice="hash", tracker=None, row=ROW) -> EPLBExperts:
    return EPLBExperts(
        copy.deepcopy(experts), ("gate_up_proj", "down_proj"), layer_index=0, phy2log=row,
        dispatcher=dispatcher, replica_choice=replica_choice, tracker=tracker,
    )


def _routing(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    return torch.randn(T, D, generator=gen), ids_TK, torch.rand(T, K, generator=gen)


# ----------------------------------------------------------------------------------- paths agree
def test_a_max_tokens_per_rank_too_large_to_allocate_names_the_field_not_a_peer():
    # The buffers are (G + 2) x C rows: C = 2**40 cannot be allocated. This once surfaced, with
    # several ranks, as a failed all-to-all blamed on a frozen or slow peer.
    layer = _layer(_experts(), dispatcher=FixedCapacityDispatcher(None, 2**40))
    x_TD, ids_TK, w_TK = _routing(4)
    with pytest.raises(EPLBError, match=r"could not allocate its buffers for max_tokens_per_rank=1099511627776 .*GiB"):
        layer(x_TD, ids_TK, w_TK)
    layer.dispatcher.capacity = 8  # the layer keeps working with a size that fits
    torch.testing.assert_close(layer(x_TD, ids_TK, w_TK), _experts()(x_TD, ids_TK, w_TK))


@pytest.mark.parametrize("path", ["direct", "fixed_capacity", "pairs"])
@pytest.mark.parametrize("replica_choice", ["hash", "round_robin"])
def test_every_path_equals_the_replaced_module(path, replica_choice):
    experts = _experts()
    dispatcher = {"direct": None, "fixed_capacity": FixedCapacityDispatcher(None, 40), "pairs": None}[path]
    layer = _layer(experts, dispatcher=dispatcher, replica_choice=replica_choice)
    if path == "pairs":
        layer.experts.eplb_combine_order = "expert"  # one rank, expert-order sum: the pair path
    for seed, T in enumerate((40, 1, 0, 17)):
        x_TD, ids_TK, w_TK = _routing(T, seed)
        torch.testing.assert_close(layer(x_TD, ids_TK, w_TK), experts(x_TD, ids_TK, w_TK))


class _FlatExperts(SwiGLUExperts):
    """An experts module eplb does not know: it refuses rows that are not one contiguous block
    (as a kernel reading ``hidden_states.data_ptr()`` would need)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        assert hidden_states.is_contiguous(), "rows with a stride"
        return super().forward(hidden_states, top_k_index, top_k_weights)


def test_fixed_capacity_rows_are_contiguous_for_an_unknown_experts_module():
    experts = _experts()
    flat = _FlatExperts(E, D, 24).eval()
    flat.load_state_dict(experts.state_dict())
    known = _layer(experts, dispatcher=FixedCapacityDispatcher(None, 20))
    unknown = _layer(flat, dispatcher=FixedCapacityDispatcher(None, 20))
    x_TD, ids_TK, w_TK = _routing(13, seed=5)
    want = experts(x_TD, ids_TK, w_TK)
    torch.testing.assert_close(unknown(x_TD, ids_TK, w_TK), want)
    torch.testing.assert_close(known(x_TD, ids_TK, w_TK), want)
    # eplb's own module takes the dispatcher's strided rows as they are (no copy).
    assert known._gathers_rows and not unknown._gathers_rows


@pytest.mark.parametrize("path", ["direct", "fixed_capacity", "pairs"])
def test_padding_ids_are_not_recorded_and_contribute_zero(path):
    experts = _experts()
    tracker = LoadTracker(1, E, 4)
    dispatcher = FixedCapacityDispatcher(None, 30) if path == "fixed_capacity" else None
    layer = _layer(experts, dispatcher=dispatcher, tracker=tracker)
    if path == "pairs":
        layer.experts.eplb_combine_order = "expert"
    x_TD, ids_TK, w_TK = _routing(30, seed=3)
    padded_TK = ids_TK.clone()
    padded_TK[::3, 1] = -1  # every third token keeps one expert
    padded_TK[5] = -1  # one token keeps none: its output is zero
    out = layer(x_TD, padded_TK, w_TK)
    tracker.step()
    keep_TK = padded_TK >= 0
    want = experts(x_TD, torch.where(keep_TK, ids_TK, 0), torch.where(keep_TK, w_TK, 0))
    torch.testing.assert_close(out, want)
    assert bool((out[5] == 0).all())
    assert torch.equal(tracker.window_load()[0], torch.bincount(padded_TK[keep_TK], minlength=E))


def test_three_real_tokens_of_eight_record_six_pairs_per_layer():
    model = mm.build_reference_model()  # 2 MoE layers, top-2
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, EPLBConfig(use_async=False, num_redundant_experts=4))
    x = mm.hidden_batch(0, batch=1, length=8)
    n = torch.tensor(8)
    wrapper.set_valid_tokens(n)
    n.fill_(3)  # a tensor is read at every forward: updating it in place is enough
    with torch.no_grad():
        out = wrapper(x)
        torch.testing.assert_close(out[:, :3], reference(x[:, :3]))
    assert torch.equal(out[:, 3:], x[:, 3:])  # padding rows get a zero MoE output in every block
    load_LE = wrapper.tracker.window_load()
    assert load_LE.sum(1).tolist() == [6, 6]  # 3 tokens x top-2, not 8 x 2 = 16
    wrapper.set_valid_tokens(None)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), reference(x))
    assert wrapper.tracker.window_load().sum(1).tolist() == [22, 22]


@pytest.mark.parametrize("implementation", [None, "eager", "batched_mm"])
def test_transformers_experts_with_padding_rows_equal_the_model_on_the_real_rows(implementation):
    pytest.importorskip("transformers")
    model = mm.build_transformers("qwen3_moe", experts_implementation=implementation)
    reference = copy.deepcopy(model)
    wrapper = EPLBWrapper(model, EPLBConfig(use_async=False, num_redundant_experts=4))
    # Probed at wrap time: transformers experts skip slot ids >= S as they are or once marked.
    assert all(layer._skips_plain or layer._skips_marked for layer in wrapper.eplb_layers)
    tokens = mm.token_batch(1, batch=1, length=9)
    wrapper.set_valid_tokens(4)
    with torch.no_grad():
        got, want = wrapper(tokens).logits, reference(tokens[:, :4]).logits
    torch.testing.assert_close(got[:, :4], want)  # causal attention: real rows never see padding
    assert int(wrapper.tracker.window_load().sum()) == 2 * 4 * mm.TOP_K


@pytest.mark.parametrize(
    "bad", [-1, 2.0, True, torch.tensor([1, 2]), torch.tensor(1.0), torch.tensor(True), "3", torch.tensor(-1),
            torch.tensor([[3]])]
)
def test_set_valid_tokens_refuses_bad_values(bad):
    wrapper = EPLBWrapper(mm.build_reference_model(), EPLBConfig(use_async=False))
    with pytest.raises(EPLBError, match="num_valid_tokens"):
        wrapper.set_valid_tokens(bad)
    assert all(layer.valid_tokens is None for layer in wrapper.eplb_layers)  # nothing half-applied


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_count_outside_the_batch_is_refused_at_the_forward(as_tensor):
    wrapper = EPLBWrapper(mm.build_reference_model(), EPLBConfig(use_async=False))
    x = mm.hidden_batch(0, batch=1, length=8)  # 8 rows reach each MoE layer
    n = torch.tensor(8) if as_tensor else 9
    wrapper.set_valid_tokens(n)
    for value in (9, -1) if as_tensor else (9,):
        if as_tensor:
            n.fill_(value)  # in place, as between graph replays: a CPU tensor is read at every forward
        with pytest.raises(EPLBError, match=rf"num_valid_tokens \({value}\) must be "):
            with torch.no_grad():
                wrapper(x)
    assert wrapper.steps == 0 and int(wrapper.tracker.window_load().sum()) == 0  # nothing counted
    if as_tensor:
        n.fill_(8)
    else:
        wrapper.set_valid_tokens(8)
    with torch.no_grad():
        wrapper(x)
    assert wrapper.steps == 1


# ------------------------------------------------------------------------------------ capacity
def test_a_batch_above_max_tokens_per_rank_is_refused_loudly():
    config = EPLBConfig(use_async=False, dispatcher="fixed_capacity", max_tokens_per_rank=5)
    wrapper = EPLBWrapper(mm.build_reference_model(), config)
    assert all(isinstance(layer.dispatcher, FixedCapacityDispatcher) for layer in wrapper.eplb_layers)
    with torch.no_grad():
        wrapper(mm.hidden_batch(0, batch=1, length=5))  # exactly at capacity
        with pytest.raises(EPLBError, match=r"6 tokens .* max_tokens_per_rank is 5"):
            wrapper(mm.hidden_batch(0, batch=1, length=6))


def test_fixed_capacity_needs_max_tokens_per_rank():
    with pytest.raises(pydantic.ValidationError, match="max_tokens_per_rank"):
        EPLBConfig(dispatcher="fixed_capacity")
    with pytest.raises(pydantic.ValidationError):
        EPLBConfig(max_tokens_per_rank=0)
    with pytest.raises(pydantic.ValidationError):
        EPLBConfig(replica_choice="random")
    with pytest.raises(EPLBError, match="max_tokens_per_rank"):
        make_dispatcher(None, kind="fixed_capacity")
    assert make_dispatcher(None) is None and make_dispatcher(None, max_tokens_per_rank=4) is None


# -------------------------------------------------------------------------------- replica choice
@given(T=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_round_robin_gives_each_replica_an_equal_share_of_every_batch(T, seed):
    layer = _layer(_experts(), replica_choice="round_robin")
    gen = torch.Generator().manual_seed(seed)
    ids_TK = torch.randint(-1, E, (T, K), generator=gen)
    slots_TK = layer.choose_slots(ids_TK)
    real = ids_TK >= 0
    assert torch.equal(ROW[slots_TK[real]], ids_TK[real])
    counts = torch.bincount(slots_TK[real], minlength=len(ROW))
    for expert in (0, 3, 7):
        share = counts[ROW == expert]
        assert int(share.max() - share.min()) <= 1, (expert, share.tolist())


def test_hash_choice_spreads_a_hot_expert_over_its_replicas():
    layer = _layer(_experts())
    ids_TK = torch.zeros(30_000, 1, dtype=torch.int64)
    counts = torch.bincount(layer.choose_slots(ids_TK).reshape(-1), minlength=len(ROW))[ROW == 0].double()
    assert float((counts - counts.mean()).abs().max()) <= 0.03 * float(counts.mean())


def test_replica_choice_follows_a_commit_in_place():
    experts = _experts()
    full = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    for choice in ("hash", "round_robin"):
        layer = _layer(experts, replica_choice=choice)
        table = layer._replica_HC
        new_row = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 1, 1, 1, 2])
        layer.commit(new_row, staged={n: t[new_row].clone() for n, t in full.items()}, slots=torch.arange(12))
        assert layer._replica_HC is table  # same storage: a captured graph sees the new table
        x_TD, ids_TK, w_TK = _routing(50, seed=1)
        assert torch.equal(new_row[layer.choose_slots(ids_TK)], ids_TK)
        torch.testing.assert_close(layer(x_TD, ids_TK, w_TK), experts(x_TD, ids_TK, w_TK))


class _UnwrittenSkips(torch.nn.Module):
    """Experts that skip slot ids >= E by leaving their rows unwritten (``torch.empty``), with no
    masking: the outputs of those pairs are whatever the memory held. Probed like transformers
    experts (it has ``config.hidden_size``)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": D})()
        self.weight = torch.nn.Parameter(torch.randn(E, D, D) / D)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        T, K = top_k_index.shape
        out_TKD = torch.empty(T, K, D)
        for t in range(T):
            for k in range(K):
                e = int(top_k_index[t, k])
                if e < self.weight.shape[0]:
                    out_TKD[t, k] = hidden_states[t] @ self.weight[e]
        return (out_TKD * top_k_weights.unsqueeze(-1)).sum(1)


def test_the_skipping_probe_is_not_fooled_by_memory_that_happens_to_be_zero():
    # Fresh memory is often zero, so unwritten rows could pass for skipped ones; the probe reads
    # them as NaN (PyTorch's deterministic fill), so such a module never counts as skipping.
    for _ in range(5):
        layer = EPLBExperts(_UnwrittenSkips(), ("weight",), layer_index=0, phy2log=ROW)
        assert (layer._skips_plain, layer._skips_marked) == (False, False)
    assert not torch.are_deterministic_algorithms_enabled()  # the probe restores the setting
