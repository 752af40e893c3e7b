"""Hypothesis strategies for policy and placement tests, shared by every test module.

``tests/`` is on ``sys.path`` (pytest puts the directory of ``tests/conftest.py`` there), so any test
can ``from property.strategies import problems, placements``.

Legend: L layers, E logical experts, P physical slots, G ranks, N nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from eplb.placement import Placement

__all__ = ["Shape", "shapes", "one_per_pack_shapes", "nodes_of_groups", "loads", "problems", "placements", "LOAD_KINDS"]

LOAD_KINDS = ("continuous", "ties", "floats")
"""``continuous``: log-normal from a drawn seed (distinct values, no ties in practice);
``ties``: small integers 0..3 (many ties and zeros); ``floats``: any finite non-negative floats
hypothesis likes (0, 1.0, huge, tiny, repeated)."""


@dataclass(frozen=True)
class Shape:
    """Sizes of one policy call."""

    num_layers: int
    num_logical: int
    num_physical: int
    num_groups: int
    num_nodes: int
    num_ranks: int

    @property
    def hierarchical(self) -> bool:
        """Whether the default policy runs its hierarchical form on this shape."""
        return self.num_groups % self.num_nodes == 0

    def kwargs(self) -> dict:
        """Keyword arguments of a policy call (everything but ``load`` and ``old``)."""
        return dict(
            num_physical=self.num_physical, num_groups=self.num_groups,
            num_nodes=self.num_nodes, num_ranks=self.num_ranks,
        )


@st.composite
def shapes(
    draw, *, hierarchical: bool | None = None, max_layers: int = 3, max_nodes: int = 3,
    max_ranks_per_node: int = 3, max_group_size: int = 4, max_groups_per_node: int = 3,
) -> Shape:
    """Valid policy shapes. ``hierarchical=True``: ``num_groups % num_nodes == 0``; ``False``: one
    group (with ``num_nodes > 1`` this takes the global fallback); ``None``: either."""
    if hierarchical is None:
        hierarchical = draw(st.booleans())
    num_nodes = draw(st.integers(1, max_nodes))
    num_ranks = num_nodes * draw(st.integers(1, max_ranks_per_node))
    if hierarchical:
        num_groups = num_nodes * draw(st.integers(1, max_groups_per_node))
    else:
        num_groups = 1
    num_logical = num_groups * draw(st.integers(1, max_group_size))
    min_physical = -(-num_logical // num_ranks) * num_ranks
    num_physical = min_physical + num_ranks * draw(st.integers(0, 2))
    num_layers = draw(st.integers(1, max_layers))
    return Shape(num_layers, num_logical, num_physical, num_groups, num_nodes, num_ranks)


@st.composite
def one_per_pack_shapes(draw, *, max_layers: int = 3) -> Shape:
    """Shapes where a packing step puts exactly one item in each pack: one group per node
    (hierarchical) and/or one slot per rank, the cases where DeepSeek's reference keeps items in
    place instead of sorting them."""
    num_nodes = draw(st.integers(1, 3))
    num_ranks = num_nodes * draw(st.integers(1, 4))
    one_slot_per_rank = draw(st.booleans())
    group_size = draw(st.integers(1, 3))
    num_groups = num_nodes if one_slot_per_rank is False or draw(st.booleans()) else 1
    if one_slot_per_rank:
        # P = G slots; E <= P and E a multiple of the groups.
        num_logical = num_groups * draw(st.integers(1, max(num_ranks // num_groups, 1)))
        num_physical = num_ranks
    else:
        num_logical = num_groups * group_size
        num_physical = -(-num_logical // num_ranks) * num_ranks + num_ranks * draw(st.integers(0, 1))
    return Shape(draw(st.integers(1, max_layers)), num_logical, num_physical, num_groups, num_nodes, num_ranks)


@st.composite
def loads(draw, shape: Shape, kind: str = "continuous") -> torch.Tensor:
    """A ``[L, E]`` float64 load of the given kind (see `LOAD_KINDS`)."""
    size = (shape.num_layers, shape.num_logical)
    if kind == "continuous":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return torch.from_numpy(rng.lognormal(0.0, 1.5, size) * 100.0)
    if kind == "ties":
        values = draw(st.lists(st.integers(0, 3), min_size=size[0] * size[1], max_size=size[0] * size[1]))
        return torch.tensor(values, dtype=torch.float64).reshape(size)
    if kind == "floats":
        finite = st.floats(0.0, 1e12, allow_nan=False, allow_infinity=False)
        values = draw(st.lists(finite, min_size=size[0] * size[1], max_size=size[0] * size[1]))
        return torch.tensor(values, dtype=torch.float64).reshape(size)
    raise ValueError(f"unknown load kind {kind!r}; use one of {LOAD_KINDS}")


@st.composite
def problems(
    draw, *, hierarchical: bool | None = None, kind: str | None = None
) -> tuple[Shape, torch.Tensor]:
    """``(shape, load)``; ``kind=None`` draws the load kind too."""
    shape = draw(shapes(hierarchical=hierarchical))
    return shape, draw(loads(shape, kind if kind is not None else draw(st.sampled_from(LOAD_KINDS))))


@st.composite
def placements(draw, shape: Shape) -> Placement:
    """A random valid `Placement` of ``shape``: every expert once, extra slots random, then shuffled."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = []
    for _ in range(shape.num_layers):
        extra = rng.integers(0, shape.num_logical, shape.num_physical - shape.num_logical)
        rows.append(rng.permutation(np.concatenate([np.arange(shape.num_logical), extra])))
    return Placement.from_phy2log(torch.from_numpy(np.stack(rows)), shape.num_logical)


def nodes_of_groups(placement: Placement, shape: Shape) -> list[dict[int, set[int]]]:
    """Per layer, the nodes that hold a replica of each expert group (``{group: {node, ...}}``)."""
    group_size = shape.num_logical // shape.num_groups
    slots_per_node = shape.num_physical // shape.num_nodes
    layers = []
    for l in range(shape.num_layers):
        nodes_of: dict[int, set[int]] = {}
        for s, e in enumerate(placement.phy2log[l].tolist()):
            nodes_of.setdefault(e // group_size, set()).add(s // slots_per_node)
        layers.append(nodes_of)
    return layers
