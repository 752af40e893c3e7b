"""Stateful property: any interleaving of forwards, rebalances and state_dict round trips keeps
the wrapped model computing exactly what the unwrapped model computes, with a valid placement
that every layer's maps and weights agree with."""

from __future__ import annotations

import copy

import moe_models as mm
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from eplb import EPLBConfig, EPLBWrapper, Placement

NUM_LAYERS = 2


class WrapperMachine(RuleBasedStateMachine):
    """One wrapped model and its unwrapped twin."""

    @initialize(
        redundant=st.sampled_from([0, 1, 4, 8]),
        policy=st.sampled_from(["default", "shuffle"]),
        step_interval=st.integers(2, 6),
        module_list=st.booleans(),
    )
    def wrap(self, redundant, policy, step_interval, module_list):
        build = mm.build_module_list_model if module_list else mm.build_reference_model
        self.reference = build(num_layers=NUM_LAYERS)
        self.config = EPLBConfig(
            num_redundant_experts=redundant,
            use_async=False,
            step_interval=step_interval,
            window_size=4,
            policy=mm.register_shuffle_policy() if policy == "shuffle" else "default",
        )
        self.wrapper = EPLBWrapper(copy.deepcopy(self.reference), self.config)
        self.logical = {
            i: {n: t.clone() for n, t in layer.logical_tensors().items()}
            for i, layer in enumerate(self.wrapper.eplb_layers)
        }

    @rule(seed=st.integers(0, 1_000), tokens=st.integers(0, 24))
    def forward(self, seed, tokens):
        x = mm.hidden_batch(seed, batch=1, length=tokens)
        with torch.no_grad():
            torch.testing.assert_close(self.wrapper(x), self.reference(x))

    @rule()
    def rebalance(self):
        self.wrapper.rebalance()

    @rule(seed=st.integers(0, 1_000))
    def state_dict_round_trip(self, seed):
        state = self.wrapper.state_dict()
        fresh = EPLBWrapper(copy.deepcopy(self.reference), self.config)
        fresh.load_state_dict(state)
        assert fresh.placement.equals(self.wrapper.placement)
        self.wrapper.close()
        self.wrapper = fresh

    @invariant()
    def placement_is_valid_and_matches_every_layer(self):
        placement = self.wrapper.placement.validate(1)
        for layer in self.wrapper.eplb_layers:
            row = placement.phy2log[layer.layer_index]
            assert torch.equal(layer.placement_row(), row)
            expected = Placement.from_phy2log(row, placement.num_logical)
            assert torch.equal(layer.logcnt.cpu(), expected.logcnt[0])
            # Every slot holds exactly its logical expert's weights.
            for name, slots in layer.slot_tensors().items():
                assert torch.equal(slots, self.logical[layer.layer_index][name][row])


TestWrapperMachine = WrapperMachine.TestCase
TestWrapperMachine.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
