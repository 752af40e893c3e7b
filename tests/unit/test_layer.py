"""EPLBExperts and the adapters: replica choice, commit, equality with the replaced module,
gradients, and how MoE layers are found (or refused)."""

from __future__ import annotations

import copy

import moe_models as mm
import pytest
import torch
from torch import nn

import eplb
from eplb import EPLBError
from eplb.moe import (
    EPLBExperts,
    ModuleListAdapter,
    MoE,
    MoEAdapter,
    MoELayerSpec,
    StackedExpertList,
    SwiGLUExperts,
    find_moe_layers,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from eplb.placement import Placement
from eplb.tracker import LoadTracker

E, D = 8, 16


def _experts(seed=0, num_experts=E, dtype=torch.float32) -> SwiGLUExperts:
    torch.manual_seed(seed)
    return SwiGLUExperts(num_experts, D, 24, dtype=dtype).eval()


def _routing(T, K=2, seed=0, num_experts=E):
    gen = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(num_experts, generator=gen)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=gen)
    x_TD = torch.randn(T, D, generator=gen)
    return x_TD, ids_TK, weights_TK


def _random_row(num_physical, seed, num_logical=E):
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
    row = torch.cat([torch.arange(num_logical), extra])
    return row[torch.randperm(num_physical, generator=gen)]


def _commit_by_hand(layer: EPLBExperts, full: dict, row):
    """Move ``layer`` to ``row`` with the logical weights ``full`` (what an executor does on one rank)."""
    staged = {n: t[row].clone() for n, t in full.items()}
    layer.commit(row, slots=torch.arange(layer.slots_per_rank), staged=staged)


# ----------------------------------------------------------------------------------- replicas
def test_each_replica_gets_an_equal_share_of_a_hot_experts_tokens():
    experts = _experts()
    row = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3, 7])  # expert 0: 3 replicas, 3 and 7: 2
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=row)
    T = 60_000
    gen = torch.Generator().manual_seed(0)
    # Correlated choices: every other token picks expert 0 first, the rest pick 3 and 7.
    ids_TK = torch.stack([torch.where(torch.arange(T) % 2 == 0, 0, 3), torch.full((T,), 7)], dim=1)
    ids_TK[torch.randperm(T, generator=gen)[: T // 10], 1] = 0  # some tokens pick 0 as second choice
    ids_TK[ids_TK[:, 0] == 0, 1] = 7
    slots_TK = layer.choose_slots(ids_TK)
    assert torch.equal(row[slots_TK], ids_TK)  # every pair goes to a replica of its expert
    counts = torch.bincount(slots_TK.reshape(-1), minlength=12).double()
    for expert in (0, 3, 7):
        replicas = (row == expert).nonzero().squeeze(1)
        share = counts[replicas]
        assert (share - share.mean()).abs().max() <= 0.05 * share.mean(), (expert, share)


def test_replica_choice_is_deterministic_and_salted_per_layer():
    experts = _experts()
    row = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0])
    a = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=row)
    b = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=1, phy2log=row)
    ids_TK = torch.zeros(64, 1, dtype=torch.int64)
    assert torch.equal(a.choose_slots(ids_TK), a.choose_slots(ids_TK))
    assert not torch.equal(a.choose_slots(ids_TK), b.choose_slots(ids_TK))


# -------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("num_physical", [8, 12, 16])
def test_outputs_equal_the_replaced_module_under_random_placements(num_physical):
    experts = _experts()
    full = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    layer = EPLBExperts(
        copy.deepcopy(experts), tuple(full), layer_index=0, phy2log=_random_row(num_physical, 0)
    )
    for seed in range(4):
        _commit_by_hand(layer, full, _random_row(num_physical, seed + 1))
        x_TD, ids_TK, w_TK = _routing(40, seed=seed)
        torch.testing.assert_close(layer(x_TD, ids_TK, w_TK), experts(x_TD, ids_TK, w_TK))


def test_zero_tokens_give_an_empty_output():
    experts = _experts()
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=_random_row(12, 0))
    out = layer(torch.zeros(0, D), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert out.shape == (0, D)


def test_expert_order_combine_matches_an_eager_index_add_loop_bitwise_in_bfloat16():
    pytest.importorskip("transformers")
    model = mm.build_transformers("mixtral", experts_implementation="eager").to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    full = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    layer = EPLBExperts(experts, tuple(full), layer_index=0, phy2log=torch.arange(E))
    assert layer.combine_order() == "expert"
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(50, mm.HIDDEN, generator=gen).to(torch.bfloat16)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(50)])
    w_TK = torch.rand(50, 2, generator=gen)
    # With the identity placement each expert sees exactly the original rows: bitwise equal.
    assert torch.equal(layer(x_TD, ids_TK, w_TK), experts(x_TD, ids_TK, w_TK))


def test_tracker_records_logical_ids():
    experts = _experts()
    tracker = LoadTracker(1, E, 4, "cpu")
    layer = EPLBExperts(
        experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=_random_row(12, 0), tracker=tracker
    )
    x_TD, ids_TK, w_TK = _routing(30)
    layer(x_TD, ids_TK, w_TK)
    tracker.step()
    assert torch.equal(tracker.window_load()[0], torch.bincount(ids_TK.reshape(-1), minlength=E))


# ----------------------------------------------------------------------------------- commit
def test_commit_updates_weights_and_maps_in_place():
    experts = _experts()
    full = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    layer = EPLBExperts(experts, tuple(full), layer_index=0, phy2log=_random_row(12, 0))
    pointers = [layer.phy2log.data_ptr(), layer.replica_slots.data_ptr(), layer.logcnt.data_ptr()]
    pointers += [t.data_ptr() for t in layer.slot_tensors().values()]
    row = _random_row(12, 5)
    _commit_by_hand(layer, full, row)
    assert pointers[:3] == [layer.phy2log.data_ptr(), layer.replica_slots.data_ptr(), layer.logcnt.data_ptr()]
    assert pointers[3:] == [t.data_ptr() for t in layer.slot_tensors().values()]
    assert torch.equal(layer.placement_row(), row)
    expected = Placement.from_phy2log(row, E)
    assert torch.equal(layer.logcnt, expected.logcnt[0])
    width = expected.log2phy.shape[2]
    assert (
        torch.equal(layer.replica_slots[:, :width], expected.log2phy[0])
        and (layer.replica_slots[:, width:] == -1).all()
    )
    for name, t in layer.slot_tensors().items():
        assert torch.equal(t, full[name][row])


def test_commit_copies_only_the_listed_slots():
    experts = _experts()
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=torch.arange(E))
    before = {n: t.clone() for n, t in layer.slot_tensors().items()}
    staged = {n: torch.zeros_like(t) for n, t in before.items()}
    layer.commit(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), slots=torch.tensor([2, 5]), staged=staged)
    for name, t in layer.slot_tensors().items():
        assert (t[[2, 5]] == 0).all() and torch.equal(t[[0, 1, 3, 4, 6, 7]], before[name][[0, 1, 3, 4, 6, 7]])


@pytest.mark.parametrize(
    ("row", "staged_names", "slots", "match"),
    [
        ([0, 1, 2], None, [], "phy2log row has 3 slots"),
        ([0, 0, 2, 3, 4, 5, 6, 7], None, [], "logical expert 1 has no replica"),
        (list(range(8)), None, [1], "no staged tensors"),
        (list(range(8)), ("gate_up_proj",), [1], "must be exactly the slot tensors"),
        (list(range(8)), ("gate_up_proj", "down_proj"), [8], r"local slot ids in \[0, 8\)"),
    ],
)
def test_commit_rejects_bad_input_and_changes_nothing(row, staged_names, slots, match):
    layer = EPLBExperts(_experts(), ("gate_up_proj", "down_proj"), layer_index=0, phy2log=torch.arange(E))
    before = {n: t.clone() for n, t in layer.slot_tensors().items()}
    staged = None if staged_names is None else {n: torch.zeros_like(before[n]) for n in staged_names}
    with pytest.raises(EPLBError, match=match):
        layer.commit(torch.tensor(row), slots=torch.tensor(slots, dtype=torch.int64), staged=staged)
    assert torch.equal(layer.placement_row(), torch.arange(E))
    assert all(torch.equal(before[n], t) for n, t in layer.slot_tensors().items())


def test_bad_routing_shapes_raise():
    layer = EPLBExperts(_experts(), ("gate_up_proj", "down_proj"), layer_index=0, phy2log=torch.arange(E))
    x_TD, ids_TK, w_TK = _routing(5)
    with pytest.raises(EPLBError, match="one row per token"):
        layer(x_TD, ids_TK[:4], w_TK[:4])
    with pytest.raises(EPLBError, match="integer tensor"):
        layer(x_TD, ids_TK.float(), w_TK)


# -------------------------------------------------------------------------------- gradients
def test_backward_gives_the_unwrapped_gradients_without_redundancy():
    experts = _experts()
    reference = copy.deepcopy(experts)
    row = _random_row(E, 3)  # a permutation
    layer = EPLBExperts(experts, ("gate_up_proj", "down_proj"), layer_index=0, phy2log=row).train()
    x_TD, ids_TK, w_TK = _routing(24)
    x1, x2 = x_TD.clone().requires_grad_(), x_TD.clone().requires_grad_()
    (layer(x1, ids_TK, w_TK) ** 2).sum().backward()
    (reference(x2, ids_TK, w_TK) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for name in ("gate_up_proj", "down_proj"):
        slot_grad = getattr(layer.experts, name).grad
        torch.testing.assert_close(slot_grad, getattr(reference, name).grad[row])


def test_backward_into_replicated_expert_weights_raises_and_everything_else_works():
    layer = EPLBExperts(_experts(), ("gate_up_proj", "down_proj"), layer_index=0, phy2log=_random_row(12, 0))
    x_TD, ids_TK, w_TK = _routing(6)
    layer.train()
    out = layer(x_TD, ids_TK, w_TK)  # forwards work in any mode
    with pytest.raises(
        EPLBError, match=r"backward reached the expert weights .* num_redundant_experts \(4\)"
    ):
        out.sum().backward()
    layer.experts.requires_grad_(False)
    x = x_TD.clone().requires_grad_()
    w = w_TK.clone().requires_grad_()
    layer(x, ids_TK, w).sum().backward()  # input and routing-weight gradients are exact with replicas
    reference = _experts()
    reference.requires_grad_(False)
    x2, w2 = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    reference(x2, ids_TK, w2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    layer.experts.requires_grad_(True)  # unfrozen after wrapping: still refused
    with pytest.raises(EPLBError, match="backward reached the expert weights"):
        layer(x_TD, ids_TK, w_TK).sum().backward()


# ------------------------------------------------------------------------------- adapters
def test_module_list_experts_are_stacked_and_computed_identically():
    block = mm.ModuleListMoEBlock()
    stacked = StackedExpertList(block.experts)
    x_TD, ids_TK, w_TK = _routing(30, seed=1)
    x_TD = torch.randn(30, mm.HIDDEN)
    expected = torch.zeros_like(x_TD)
    for t in range(30):
        for k in range(2):
            expected[t] += block.experts[int(ids_TK[t, k])](x_TD[t : t + 1])[0] * w_TK[t, k]
    torch.testing.assert_close(stacked(x_TD, ids_TK, w_TK), expected)
    restored = stacked.to_module_list()
    assert all(torch.equal(a.w1.weight, b.w1.weight) for a, b in zip(restored, block.experts))


def test_module_list_adapter_refuses_a_block_it_cannot_reproduce():
    model = mm.ResidualStack([mm.SigmoidRoutedBlock()])
    with pytest.raises(EPLBError, match="do not reproduce the block's own output.*override route"):
        find_moe_layers(model)


def test_no_moe_layer_error_names_the_module_types_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(
        EPLBError,
        match=r"no MoE layer found in Sequential \(module types seen: Sequential, Linear, "
        r"ReLU\).*eplb.register_adapter",
    ):
        find_moe_layers(model)


def test_finds_reference_layers_in_model_order_and_skips_shared_mlps():
    model = mm.build_reference_model(num_layers=3)
    specs = find_moe_layers(model)
    assert [s.name for s in specs] == ["blocks.0.experts", "blocks.1.experts", "blocks.2.experts"]
    assert all(s.adapter.name == "stacked_experts" and s.num_experts == E for s in specs)
    assert find_moe_layers(mm.build_module_list_model())[0].adapter.name == "module_list"


class _SigmoidAdapter(ModuleListAdapter):
    """A user adapter for `mm.SigmoidRoutedBlock`: same structure, sigmoid routing."""

    name = "sigmoid_test"

    def matches(self, block):
        return isinstance(block, mm.SigmoidRoutedBlock)

    def route(self, block, x_TD):
        weights_TK, ids_TK = torch.topk(torch.sigmoid(block.gate(x_TD)), block.top_k, dim=-1)
        return ids_TK, weights_TK


def test_a_registered_adapter_is_asked_first_and_wraps_a_custom_block():
    adapter = register_adapter(_SigmoidAdapter())
    try:
        assert registered_adapters()[0] is adapter
        with pytest.raises(EPLBError, match="already registered"):
            register_adapter(adapter)
        torch.manual_seed(0)
        model = mm.ResidualStack([mm.SigmoidRoutedBlock(), mm.SigmoidRoutedBlock()]).eval()
        reference = copy.deepcopy(model)
        config = eplb.EPLBConfig(
            num_redundant_experts=4, use_async=False, policy=mm.register_shuffle_policy()
        )
        wrapper = eplb.EPLBWrapper(model, config)
        assert all(spec.adapter is adapter for spec in wrapper._specs)
        with torch.no_grad():
            for seed in range(3):
                x = mm.hidden_batch(seed)
                torch.testing.assert_close(wrapper(x), reference(x))
                wrapper.rebalance()
    finally:
        unregister_adapter(adapter)
    assert adapter not in registered_adapters()


class _BadShapeAdapter(MoEAdapter):
    name = "bad_shape"

    def match(self, module, *, name, parent, attr):
        if not isinstance(module, SwiGLUExperts):
            return None
        return MoELayerSpec(
            name=name,
            adapter=self,
            parent=parent,
            attr=attr,
            original=module,
            experts=module,
            expert_tensors=("gate_up_proj", "down_proj"),
            num_experts=module.num_experts + 1,
        )


def test_an_adapter_reporting_inconsistent_shapes_is_refused_and_the_model_untouched():
    model = mm.build_reference_model()
    before = copy.deepcopy(model.state_dict())
    adapter = register_adapter(_BadShapeAdapter())
    try:
        with pytest.raises(
            EPLBError, match=r"adapter 'bad_shape'.*leading dimension must be num_experts \(9\)"
        ):
            eplb.EPLBWrapper(model, eplb.EPLBConfig(use_async=False))
    finally:
        unregister_adapter(adapter)
    assert all(isinstance(b.experts, SwiGLUExperts) for b in model.blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrapping_twice_is_refused():
    model = mm.build_reference_model()
    eplb.EPLBWrapper(model, eplb.EPLBConfig(use_async=False))
    with pytest.raises(EPLBError, match="already wrapped"):
        eplb.EPLBWrapper(model, eplb.EPLBConfig(use_async=False))


def test_reference_moe_matches_a_per_token_loop():
    layer = MoE(D, 24, E, 2)
    x = torch.randn(3, 5, D)
    ids_TK, w_TK = layer.route(x.reshape(-1, D))
    flat = x.reshape(-1, D)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(2):
            e = int(ids_TK[t, k])
            gate, up = (layer.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            expected[t] += w_TK[t, k] * (layer.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(layer(x), expected.reshape(x.shape))
