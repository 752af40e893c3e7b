"""LoadTracker: counts, window, padding, state, the recording gate and input errors."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eplb.errors import EPLBError
from eplb.tracker import LoadTracker


def bincount_reference(ids_TK: torch.Tensor, num_logical: int, num_valid: int | None = None) -> torch.Tensor:
    """[E] int64 — the obviously correct count: drop padded rows and negative ids, bincount the rest."""
    if num_valid is not None:
        ids_TK = ids_TK[:num_valid]
    ids = ids_TK.reshape(-1).to(torch.int64)
    return torch.bincount(ids[ids >= 0], minlength=num_logical)


@st.composite
def batches(draw):
    """A tracker size and a list of (layer, ids, num_valid or None, as_tensor) records of one step."""
    num_layers = draw(st.integers(1, 4))
    num_logical = draw(st.integers(1, 12))
    records = []
    for _ in range(draw(st.integers(0, 6))):
        T = draw(st.integers(0, 9))
        K = draw(st.integers(1, 4))
        values = draw(st.lists(st.integers(-3, num_logical - 1), min_size=T * K, max_size=T * K))
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16]))
        ids = torch.tensor(values, dtype=dtype).reshape(T, K)
        num_valid = draw(st.one_of(st.none(), st.integers(0, T + 2)))
        as_tensor = draw(st.booleans())
        records.append((draw(st.integers(0, num_layers - 1)), ids, num_valid, as_tensor))
    return num_layers, num_logical, records


@given(batches())
def test_counts_equal_bincount_reference(batch):
    num_layers, num_logical, records = batch
    tracker = LoadTracker(num_layers, num_logical, window_size=2)
    expected_LE = torch.zeros(num_layers, num_logical, dtype=torch.int64)
    for layer, ids, num_valid, as_tensor in records:
        n = torch.tensor(num_valid) if (as_tensor and num_valid is not None) else num_valid
        tracker.record(layer, ids, n)
        expected_LE[layer] += bincount_reference(ids, num_logical, num_valid)
    tracker.step()
    assert torch.equal(tracker.last_step_load(), expected_LE)
    assert torch.equal(tracker.window_load(), expected_LE)
    assert tracker.window_load().dtype == torch.int64


def _step_ids(step: int, layer: int, T: int = 10, K: int = 3, E: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7 * step + layer)
    return torch.randint(-2, E, (T, K), generator=gen)


@pytest.mark.parametrize("window_size", [1, 3, 5])
def test_window_drops_exactly_the_oldest_step(window_size):
    L, E = 2, 6
    tracker = LoadTracker(L, E, window_size)
    per_step = []
    for step in range(3 * window_size + 2):
        for layer in range(L):
            tracker.record(layer, _step_ids(step, layer))
        tracker.step()
        per_step.append(torch.stack([bincount_reference(_step_ids(step, layer), E) for layer in range(L)]))
        assert torch.equal(tracker.window_load(), sum(per_step[-window_size:]))
        assert torch.equal(tracker.last_step_load(), per_step[-1])
        assert tracker.steps_recorded == step + 1


def test_current_step_is_not_in_the_window_until_step():
    tracker = LoadTracker(1, 4, 3)
    tracker.record(0, torch.tensor([[0, 1]]))
    assert torch.equal(tracker.window_load(), torch.zeros(1, 4, dtype=torch.int64))
    tracker.step()
    assert tracker.window_load().tolist() == [[1, 1, 0, 0]]


def test_last_step_load_is_zero_before_the_first_step():
    tracker = LoadTracker(2, 3, 4)
    assert torch.equal(tracker.last_step_load(), torch.zeros(2, 3, dtype=torch.int64))


def test_num_valid_tokens_tensor_is_read_at_each_call():
    tracker = LoadTracker(1, 4, 2)
    ids = torch.tensor([[0, 1], [2, 3], [3, 3]])
    n = torch.tensor([3])
    tracker.record(0, ids, n)
    n.fill_(1)  # updated in place, as between CUDA-graph replays of a padded batch
    tracker.record(0, ids, n)
    n.fill_(0)
    tracker.record(0, ids, n)
    tracker.step()
    assert tracker.window_load().tolist() == [[2, 2, 1, 3]]


def test_window_load_returns_a_copy():
    tracker = LoadTracker(1, 2, 2)
    tracker.record(0, torch.tensor([[0]]))
    tracker.step()
    tracker.window_load().add_(100)
    tracker.last_step_load().add_(100)
    assert tracker.window_load().tolist() == [[1, 0]]
    assert tracker.last_step_load().tolist() == [[1, 0]]


def _feed(tracker: LoadTracker, steps: range, partial: bool = False) -> None:
    for step in steps:
        for layer in range(tracker.num_layers):
            tracker.record(layer, _step_ids(step, layer))
        tracker.step()
    if partial:
        tracker.record(0, _step_ids(999, 0))


def test_state_dict_round_trip_keeps_window_position_and_current_step():
    a = LoadTracker(2, 6, 3)
    _feed(a, range(5), partial=True)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = LoadTracker(2, 6, 3)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.steps_recorded == a.steps_recorded == 5
    assert torch.equal(b.window_load(), a.window_load())
    assert torch.equal(b.last_step_load(), a.last_step_load())
    # Continuing both the same way keeps them identical: the ring position and the unfinished
    # step travelled with the state.
    for tracker in (a, b):
        tracker.step()
        _feed(tracker, range(5, 9))
    assert torch.equal(b.window_load(), a.window_load())
    assert torch.equal(b.last_step_load(), a.last_step_load())


def test_load_state_dict_rejects_other_sizes():
    state = LoadTracker(2, 6, 3).state_dict()
    with pytest.raises(EPLBError, match=r"\(num_layers, num_logical, window_size\) = \(2, 6, 3\)"):
        LoadTracker(2, 6, 4).load_state_dict(state)
    with pytest.raises(EPLBError, match="not a LoadTracker state_dict"):
        LoadTracker(2, 6, 3).load_state_dict({"window": state["window"]})
    state["window"] = state["window"][:, :, :5]
    with pytest.raises(EPLBError, match="shapes"):
        LoadTracker(2, 6, 3).load_state_dict(state)


def test_reset_forgets_everything():
    tracker = LoadTracker(2, 6, 3)
    _feed(tracker, range(4), partial=True)
    tracker.reset()
    assert tracker.steps_recorded == 0
    tracker.step()
    assert torch.equal(tracker.window_load(), torch.zeros(2, 6, dtype=torch.int64))


def test_disabled_tracker_records_nothing_until_enabled_again():
    tracker = LoadTracker(1, 3, 4)
    assert tracker.enabled
    tracker.enabled = False
    tracker.record(0, torch.tensor([[0, 1]]))
    tracker.step()
    tracker.enabled = True
    tracker.record(0, torch.tensor([[2, 2]]))
    tracker.step()
    assert tracker.window_load().tolist() == [[0, 0, 2]]
    assert tracker.steps_recorded == 2  # steps still advance while disabled


def test_out_of_range_ids_from_a_checkpoint_make_window_load_raise():
    # On accelerators ids >= E are only counted (no sync); the count travels in the state.
    state = LoadTracker(1, 3, 2).state_dict()
    state["out_of_range"] = 2
    tracker = LoadTracker(1, 3, 2)
    tracker.load_state_dict(state)
    with pytest.raises(EPLBError, match="2 recorded expert id"):
        tracker.window_load()
    tracker.reset()
    tracker.window_load()


@pytest.mark.parametrize(
    ("layer", "ids", "match"),
    [
        (2, torch.tensor([[0]]), r"layer \(2\) must be in \[0, num_layers=2\)"),
        (-1, torch.tensor([[0]]), r"layer \(-1\) must be in"),
        (True, torch.tensor([[0]]), r"layer \(True\)"),
        (0.0, torch.tensor([[0]]), "layer must be a Python int"),
        (0, torch.tensor([0, 1]), r"\[T, K\] tensor, got shape \(2,\)"),
        (0, torch.tensor([[0.0]]), "integer expert ids, got dtype torch.float32"),
        (0, torch.tensor([[True]]), "integer expert ids, got dtype torch.bool"),
        (0, [[0, 1]], "must be a torch.Tensor"),
        (0, torch.tensor([[0, 4]]), r"expert id 4, outside \[0, num_logical=4\)"),
        (0, torch.zeros(1, 1, dtype=torch.int64, device="meta"), "is on meta but the tracker is on cpu"),
    ],
)
def test_record_rejects_bad_input(layer, ids, match):
    tracker = LoadTracker(2, 4, 3)
    with pytest.raises(EPLBError, match=match):
        tracker.record(layer, ids)
    tracker.step()
    assert tracker.window_load().sum() == 0  # a rejected call counted nothing


@pytest.mark.parametrize(
    ("num_valid", "match"),
    [
        (torch.tensor([1, 2]), "one-element integer tensor"),
        (torch.tensor(1.0), "one-element integer tensor"),
        (-1, r"num_valid_tokens \(-1\) must be >= 0"),
        (torch.tensor(-2), r"num_valid_tokens \(-2\) must be >= 0"),
        (True, "must be an int tensor or an int, got bool"),
        ("3", "must be an int tensor or an int"),
    ],
)
def test_record_rejects_bad_num_valid_tokens(num_valid, match):
    with pytest.raises(EPLBError, match=match):
        LoadTracker(1, 4, 3).record(0, torch.tensor([[0, 1]]), num_valid)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, r"num_layers \(0\) must be an int >= 1"),
        ({"num_logical": 2.0}, r"num_logical \(2.0\) must be an int >= 1"),
        ({"window_size": 0}, r"window_size \(0\) must be an int >= 1"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, match):
    args = {"num_layers": 1, "num_logical": 2, "window_size": 1, **kwargs}
    with pytest.raises(EPLBError, match=match):
        LoadTracker(**args)


def test_window_load_with_a_group_needs_torch_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(EPLBError, match="torch.distributed is not initialised"):
        LoadTracker(1, 2, 1).window_load(group=object())


@given(
    ids=st.lists(st.lists(st.integers(-1, 5), min_size=2, max_size=2), min_size=0, max_size=30),
)
def test_trusted_record_counts_like_the_checked_one(ids):
    ids_TK = torch.tensor(ids, dtype=torch.int64).reshape(-1, 2)
    checked, trusted = LoadTracker(1, 6, 2), LoadTracker(1, 6, 2)
    checked.record(0, ids_TK)
    trusted.record(0, ids_TK, trusted=True)
    checked.step()
    trusted.step()
    assert torch.equal(checked.window_load(), trusted.window_load())
    valid = ids_TK[ids_TK >= 0]
    assert torch.equal(trusted.window_load()[0], torch.bincount(valid, minlength=6))


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_record_never_modifies_the_callers_ids(trusted, as_tensor):
    ids_TK = torch.tensor([[0, 1], [2, 3], [1, 1]])
    before = ids_TK.clone()
    tracker = LoadTracker(1, 4, 2)
    n = torch.tensor(1) if as_tensor else 1
    tracker.record(0, ids_TK, n, trusted=trusted)
    tracker.step()
    assert torch.equal(ids_TK, before)
    assert tracker.window_load()[0].tolist() == [1, 1, 0, 0]
