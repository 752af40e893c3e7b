"""Placement: derivation of the maps, the initial placement, validation, helpers, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from eplb.errors import EPLBError
from eplb.placement import Placement

# 2 layers, 3 logical experts, 4 slots (2 ranks of 2 slots).
PHY2LOG = [[0, 1, 2, 0], [2, 2, 1, 0]]


def example() -> Placement:
    return Placement.from_phy2log(torch.tensor(PHY2LOG), 3)


# ---------------------------------------------------------------------- from_phy2log
def test_from_phy2log_derives_log2phy_and_logcnt():
    placement = example()
    assert placement.logcnt.tolist() == [[2, 1, 1], [1, 1, 2]]
    assert placement.log2phy.tolist() == [
        [[0, 3], [1, -1], [2, -1]],
        [[3, -1], [2, -1], [0, 1]],
    ]
    assert placement.phy2log.dtype == placement.log2phy.dtype == placement.logcnt.dtype == torch.int64
    assert (placement.num_layers, placement.num_logical, placement.num_physical) == (2, 3, 4)


def test_from_phy2log_reads_a_1d_tensor_as_one_layer():
    placement = Placement.from_phy2log(torch.tensor([1, 0, 1]), 2)
    assert placement.phy2log.tolist() == [[1, 0, 1]]
    assert placement.log2phy.tolist() == [[[1, -1], [0, 2]]]


@pytest.mark.parametrize(
    ("phy2log", "num_logical", "match"),
    [
        (torch.tensor([[0, 3]]), 3, r"expert id 3, outside \[0, num_logical=3\)"),
        (torch.tensor([[0, -1]]), 3, r"expert id -1"),
        (torch.tensor([[0.0, 1.0]]), 2, r"integer expert ids, got dtype torch.float32"),
        (torch.zeros(1, 2, 2, dtype=torch.int64), 2, r"must be a \[L, P\] tensor, got shape \(1, 2, 2\)"),
        (torch.tensor([[0, 0]]), 0, r"num_logical \(0\) must be > 0"),
    ],
)
def test_from_phy2log_rejects_bad_input(phy2log, num_logical, match):
    with pytest.raises(EPLBError, match=match):
        Placement.from_phy2log(phy2log, num_logical)


# ---------------------------------------------------------------------- initial
def test_initial_places_every_expert_once_and_spreads_redundant_slots_over_ranks():
    placement = Placement.initial(num_layers=3, num_logical=10, num_physical=16, num_ranks=4).validate(4)
    assert placement.phy2log.shape == (3, 16)
    assert torch.equal(placement.phy2log[0], placement.phy2log[2])  # no load yet: all layers alike
    # 6 redundant slots over 4 ranks: 2, 2, 1, 1, at the end of each rank, after its primaries.
    redundant_per_rank = [2, 2, 1, 1]
    ranks = [placement.experts_of_rank(0, g, 4) for g in range(4)]
    primaries = [e for g, experts in enumerate(ranks) for e in experts[: 4 - redundant_per_rank[g]]]
    assert primaries == list(range(10))
    assert (placement.logcnt >= 1).all()
    assert int((placement.logcnt - 1).sum(1)[0]) == 6


def test_initial_without_redundant_slots_is_the_identity():
    placement = Placement.initial(2, 8, 8, 4)
    assert placement.phy2log.tolist() == [list(range(8))] * 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 8, 6, 2), r"num_physical \(6\) must be >= num_logical \(8\)"),
        ((1, 8, 10, 4), r"num_physical \(10\) must be a multiple of num_ranks \(4\); set num_redundant_"),
        ((1, 8, 8, 0), r"num_ranks \(0\) must be > 0"),
        ((-1, 8, 8, 2), r"num_layers \(-1\) must be >= 0"),
    ],
)
def test_initial_rejects_bad_sizes(args, match):
    with pytest.raises(EPLBError, match=match):
        Placement.initial(*args)


# ---------------------------------------------------------------------- validate
def test_validate_accepts_a_consistent_placement_and_returns_it():
    placement = example()
    assert placement.validate(2) is placement
    assert placement.validate() is placement


def test_validate_names_an_expert_without_replica():
    placement = Placement.from_phy2log(torch.tensor([[0, 0, 1, 1]]), 3)
    with pytest.raises(EPLBError, match=r"layer 0: logical expert 2 has no replica"):
        placement.validate(2)


def test_validate_rejects_slots_not_divisible_by_ranks():
    with pytest.raises(EPLBError, match=r"num_physical \(4\) must be a multiple of num_ranks \(3\)"):
        example().validate(3)


def test_validate_rejects_inconsistent_maps():
    good = example()
    wrong_count = Placement(good.phy2log, good.log2phy, good.logcnt.flip(1).contiguous())
    with pytest.raises(EPLBError, match="logcnt does not match phy2log"):
        wrong_count.validate()
    wrong_slots = Placement(good.phy2log, good.log2phy.flip(2).contiguous(), good.logcnt)
    with pytest.raises(EPLBError, match="log2phy does not match phy2log"):
        wrong_slots.validate()
    out_of_range = Placement(good.phy2log + 5, good.log2phy, good.logcnt)
    with pytest.raises(EPLBError, match=r"layer 0, slot 0 holds expert 5, outside \[0, 3\)"):
        out_of_range.validate()
    wrong_dtype = Placement(good.phy2log.int(), good.log2phy, good.logcnt)
    with pytest.raises(EPLBError, match="Placement.phy2log must be an int64 tensor"):
        wrong_dtype.validate()
    wrong_shape = Placement(good.phy2log[0], good.log2phy, good.logcnt)
    with pytest.raises(EPLBError, match=r"shapes must be phy2log \[L, P\]"):
        wrong_shape.validate()


# ---------------------------------------------------------------------- helpers
def test_rank_and_slot_helpers():
    placement = example()
    assert placement.slots_per_rank(2) == 2
    assert placement.rank_of_slot(3, 2) == 1
    assert placement.rank_of_slot(torch.arange(4), 2).tolist() == [0, 0, 1, 1]
    assert list(placement.slots_of_rank(1, 2)) == [2, 3]
    assert placement.experts_of_rank(1, 0, 2) == [2, 2]
    with pytest.raises(EPLBError, match=r"rank \(2\) must be in \[0, num_ranks=2\)"):
        placement.slots_of_rank(2, 2)


def test_layer_replace_layer_and_equals():
    placement = example()
    second = placement.layer(1)
    assert second.phy2log.tolist() == [PHY2LOG[1]]
    swapped = placement.replace_layer(0, second)
    assert swapped.phy2log.tolist() == [PHY2LOG[1], PHY2LOG[1]]
    assert placement.phy2log.tolist() == PHY2LOG  # frozen: the original is untouched
    assert swapped.equals(Placement.from_phy2log(torch.tensor([PHY2LOG[1]] * 2), 3))
    assert not swapped.equals(placement)
    assert not placement.equals(placement.layer(0))
    for other in (None, placement.phy2log):
        with pytest.raises(EPLBError, match="Placement.equals compares two placements"):
            placement.equals(other)


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    placement = Placement.initial(4, 16, 20, 4)
    path = tmp_path / "placement.json"
    placement.save(path)
    loaded = Placement.load(path)
    assert loaded.equals(placement)
    assert torch.equal(loaded.log2phy, placement.log2phy) and torch.equal(loaded.logcnt, placement.logcnt)
    assert Placement.from_dict(placement.to_dict()).equals(placement)


def _write(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_load_rejects_bad_files(tmp_path):
    good = example().to_dict()
    cases = [
        ("{not json", r"is not valid JSON"),
        ({"format": "something else"}, r"is not an eplb placement"),
        ([1, 2, 3], r"is not an eplb placement"),
        ({**good, "version": 99}, r"has placement format version 99; this eplb reads version 1"),
        ({k: v for k, v in good.items() if k != "num_logical"}, r"is malformed"),
        ({**good, "num_physical": 5}, r"phy2log has shape \(2, 4\) but the header says"),
        ({**good, "phy2log": [[0, 0, 0, 0], [0, 1, 2, 0]]}, r"logical expert 1 has no replica"),
        ({**good, "phy2log": [[0, 1, 2, 7], [0, 1, 2, 0]]}, r"expert id 7"),
    ]
    for content, match in cases:
        with pytest.raises(EPLBError, match=match):
            Placement.load(_write(tmp_path, content))
    with pytest.raises(EPLBError, match=r"placement file '.*missing.json' does not exist"):
        Placement.load(tmp_path / "missing.json")


def _bad_placements():
    good = example().to_dict()  # L=2, E=3, P=4
    return [
        ("{not json", None, r"is not valid JSON"),
        ("[1, NaN]", None, r"NaN is not an expert id"),
        ("[" * 100_000 + "]" * 100_000, None, r"nested too deeply"),
        ([1, 2, 3], None, r"is not an eplb placement"),
        ({**good, "version": 99}, None, r"has placement format version 99"),
        ({**good, "num_layers": True}, None, r"'num_layers' \(True\) must be an int >= 0"),
        ({**good, "phy2log": "0 1 2 0"}, None, r"'phy2log' must be a list of rows"),
        ({**good, "phy2log": [[0, 1, 2, 0], [0, 1]]}, None, r"rows have different lengths"),
        ({**good, "num_physical": 5}, None, r"phy2log has shape \(2, 4\) but the header says"),
        ({**good, "phy2log": [[0, 1, 2, 0.0], [0, 1, 2, 0]]}, None, r"phy2log\[0\]\[3\] \(0.0\) must be an int"),
        ({**good, "phy2log": [[0, 1, 2, 7], [0, 1, 2, 0]]}, None, r"expert id 7"),
        ({**good, "phy2log": [[0, 0, 0, 0], [0, 1, 2, 0]]}, None, r"logical expert 1 has no replica"),
        ({**good, "num_logical": 0, "num_layers": 0, "phy2log": []}, None, r"num_logical \(0\) must be in \[1, "),
        ({**good, "num_logical": 2**70}, None, r"num_logical \(\d+\) must be in \[1, num_physical=4\]"),
        (good, 3, r"num_physical \(4\) must be a multiple of num_ranks \(3\)"),
        ({**good, "plan": {"num_ranks": 4}}, 2, r"was planned for 4 EP ranks but is used with 2"),
    ]


@pytest.mark.parametrize(("content", "num_ranks", "match"), _bad_placements())
def test_every_load_error_names_the_file(tmp_path, content, num_ranks, match):
    path = _write(tmp_path, content)
    with pytest.raises(EPLBError, match=match) as info:
        Placement.load(path, num_ranks=num_ranks)
    assert str(info.value).startswith(f"placement file {path!r}")
    assert "\n" not in str(info.value)


def test_load_for_the_ranks_a_file_was_planned_for(tmp_path):
    path = _write(tmp_path, {**example().to_dict(), "plan": {"num_ranks": 2}})
    assert Placement.load(path, num_ranks=2).equals(example())
    assert Placement.load(path).equals(example())  # the ranks are checked only when given
    saved = tmp_path / "saved.json"
    example().save(saved)  # no plan record: any G dividing P
    assert Placement.load(saved, num_ranks=4).equals(example())


def test_a_placement_never_aliases_the_tensor_it_was_built_from():
    row = torch.tensor([[0, 1, 2, 3, 0, 1]])
    placement = Placement.from_phy2log(row, 4)
    row[0, 0] = 3  # the caller (or a layer's buffer) changes its tensor in place
    assert placement.phy2log[0, 0].item() == 0
    placement.validate(2)
