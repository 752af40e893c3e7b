"""Properties of logical loads, for any placement and any rank: each slot of the rank ends up
holding its logical expert's row of the source, and the reader touched only the rows of the
distinct experts the rank holds (one read each). Ranks are simulated in one process: a layer
built for rank ``r`` of ``G`` holds exactly what rank ``r`` would."""

from __future__ import annotations

import moe_models as mm
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property.strategies import Shape, placements
from safetensors.torch import save_file

from eplb.checkpoint import LogicalLoader
from eplb.moe import EPLBExperts, find_moe_layers


@st.composite
def rank_problems(draw):
    """``(shape, placement, rank)`` for one layer of the reference model's 8 experts."""
    num_ranks = draw(st.sampled_from([1, 2, 4]))
    num_physical = 8 + num_ranks * draw(st.integers(0, 3))
    shape = Shape(1, 8, num_physical, 1, 1, num_ranks)
    return shape, draw(placements(shape)), draw(st.integers(0, num_ranks - 1))


@pytest.mark.parametrize("source_kind", ["state_dict", "safetensors"])
@given(problem=rank_problems(), seed=st.integers(0, 2**16))
def test_every_slot_holds_its_experts_row_and_only_needed_rows_are_read(source_kind, problem, seed, tmp_path_factory):
    shape, placement, rank = problem
    model = mm.build_reference_model(num_layers=1)
    specs = find_moe_layers(model)
    layer = EPLBExperts(
        specs[0].experts, specs[0].expert_tensors, layer_index=0, phy2log=placement.phy2log[0],
        num_ranks=shape.num_ranks, rank=rank,
    )
    loader = LogicalLoader(model, specs)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    source = state
    if source_kind == "safetensors":
        source = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
        save_file(state, str(source))
    report = loader.load(source, strict=True, layers=[layer], rank=rank, before_write=lambda: "none")

    S = shape.num_physical // shape.num_ranks
    own_S = placement.phy2log[0, rank * S : (rank + 1) * S]
    for name, slots in layer.slot_tensors().items():
        assert torch.equal(slots, state[f"blocks.0.experts.{name}"][own_S])
    distinct = len(set(own_S.tolist()))
    assert report.expert_rows_read == distinct * len(specs[0].expert_tensors)
    row_bytes = sum(state[f"blocks.0.experts.{n}"][0].numel() * 4 for n in specs[0].expert_tensors)
    assert report.bytes_read == distinct * row_bytes + state["blocks.0.gate.weight"].numel() * 4
    assert torch.equal(model.blocks[0].gate.weight, state["blocks.0.gate.weight"])
