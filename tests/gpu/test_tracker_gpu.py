"""LoadTracker on CUDA: no host sync on the hot path, CUDA-graph capture and replay, gloo staging."""

import pytest
import torch

from eplb.errors import EPLBError
from eplb.testing import capture_graph
from eplb.tracker import LoadTracker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L, E, W, T, K = 3, 16, 4, 64, 4


def _reference(ids_TK: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
    ids = ids_TK[:num_valid].reshape(-1).cpu()
    return torch.bincount(ids[ids >= 0], minlength=E)


def test_record_and_step_do_not_synchronise():
    tracker = LoadTracker(L, E, W, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(-1, E, (T, K), device="cuda", generator=gen)
    ids32 = ids.to(torch.int32)
    n = torch.tensor(T - 5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(W + 2):
            tracker.record(0, ids, n)
            tracker.record(1, ids32)
            tracker.record(2, ids, 7)
            tracker.step()
        tracker.last_step_load()
        tracker.enabled = False
        tracker.record(0, ids)
        tracker.enabled = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = torch.stack([_reference(ids, T - 5), _reference(ids), _reference(ids, 7)]) * W
    assert torch.equal(tracker.window_load().cpu(), expected)


def test_captured_record_and_step_replay_with_new_ids():
    tracker = LoadTracker(L, E, W, device="cuda")
    static_ids = [torch.zeros(T, K, dtype=torch.int64, device="cuda") for _ in range(L)]
    static_n = torch.tensor(T, device="cuda")

    def one_step():
        tracker.record(0, static_ids[0], static_n)
        tracker.record(1, static_ids[1])
        tracker.record(2, static_ids[2], static_n)
        tracker.step()

    # Warm up on a side stream (as torch.cuda.graphs recommends), then forget the warm-up.
    graph, _ = capture_graph(one_step, warmup=3, before_capture=tracker.reset)
    assert tracker.steps_recorded == 0  # capture ran nothing

    gen = torch.Generator().manual_seed(1)
    per_step = []
    for step in range(2 * W + 1):
        host_ids = [torch.randint(-1, E, (T, K), generator=gen) for _ in range(L)]
        n = int(torch.randint(0, T + 1, (), generator=gen))
        for buf, ids in zip(static_ids, host_ids):
            buf.copy_(ids)
        static_n.fill_(n)
        graph.replay()
        valid = [n, None, n]  # layer 1 is recorded without num_valid_tokens
        per_step.append(torch.stack([_reference(ids, v) for ids, v in zip(host_ids, valid)]))
        assert torch.equal(tracker.last_step_load().cpu(), per_step[-1]), f"step {step}"
        assert torch.equal(tracker.window_load().cpu(), sum(per_step[-W:])), f"step {step}"
        assert tracker.steps_recorded == step + 1


def test_out_of_range_ids_on_cuda_are_reported_by_window_load():
    tracker = LoadTracker(1, E, W, device="cuda")
    tracker.record(0, torch.tensor([[0, E], [1, E + 5]], device="cuda"))  # no sync, no device assert
    tracker.step()
    with pytest.raises(EPLBError, match=f"2 recorded expert id\\(s\\) were >= num_logical \\({E}\\)"):
        tracker.window_load()


def test_window_load_over_a_gloo_group_reduces_a_cpu_copy(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        tracker = LoadTracker(1, E, W, device="cuda")
        tracker.record(0, torch.tensor([[0, 3], [3, -1]], device="cuda"))
        tracker.step()
        load = tracker.window_load(group=dist.group.WORLD)
        assert load.device == tracker.device
        assert load.cpu()[0, :4].tolist() == [1, 0, 0, 2]
    finally:
        dist.destroy_process_group()


def test_enabled_flag_is_honoured_by_replays_and_first_use_inside_capture_is_safe():
    # No warm-up: the row-index helper for num_valid_tokens is first built inside the capture,
    # where its values exist only on replay; it must not be kept for eager calls.
    tracker = LoadTracker(1, E, W, device="cuda")
    static_ids = torch.randint(0, E, (T, K), device="cuda")
    static_n = torch.tensor(T // 2, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tracker.record(0, static_ids, static_n)
        tracker.step()
    graph.replay()
    expected = _reference(static_ids, T // 2)
    assert torch.equal(tracker.last_step_load().cpu()[0], expected)
    tracker.enabled = False
    graph.replay()
    assert tracker.last_step_load().sum().item() == 0 and tracker.steps_recorded == 2
    tracker.enabled = True
    tracker.record(0, static_ids, static_n)  # eager, after the capture
    tracker.step()
    assert torch.equal(tracker.last_step_load().cpu()[0], expected)
    assert torch.equal(tracker.window_load().cpu()[0], 2 * expected)


def test_step_replays_its_captured_kernels_and_matches_a_cpu_tracker_in_every_state():
    import copy
    import pickle

    gpu = LoadTracker(L, E, W, device="cuda")
    cpu = LoadTracker(L, E, W, device="cpu")
    assert gpu._step_graph is not None and cpu._step_graph is None
    gen = torch.Generator().manual_seed(1)

    def feed(trackers, steps):
        for _ in range(steps):
            ids = torch.randint(-1, E, (T, K), generator=gen)
            for tracker in trackers:
                for layer in range(L):
                    tracker.record(layer, ids.to(tracker.device), trusted=True)
                tracker.step()

    def same(a, b):
        assert torch.equal(a.window_load().cpu(), b.window_load().cpu())
        assert torch.equal(a.last_step_load().cpu(), b.last_step_load().cpu())
        assert a.steps_recorded == b.steps_recorded

    feed([gpu, cpu], W + 3)  # the ring wraps
    same(gpu, cpu)
    # A copy captures its own graph over its own buffers; the original is untouched by it.
    twin = copy.deepcopy(gpu)
    assert twin._step_graph is not None and twin._step_graph is not gpu._step_graph
    revived = pickle.loads(pickle.dumps(gpu))
    feed([twin, revived, cpu], 2)
    same(twin, cpu)
    same(revived, cpu)
    assert gpu.steps_recorded == W + 3
    # A loaded state is written into the same buffers, so the graph keeps stepping it.
    gpu.load_state_dict(cpu.state_dict())
    feed([gpu, cpu], 3)
    same(gpu, cpu)
    # Inside a user's capture the kernels are captured one by one; every replay is a step.
    ids = torch.randint(-1, E, (T, K), generator=gen)
    static = ids.cuda()

    def captured_step():
        for layer in range(L):
            gpu.record(layer, static, trusted=True)
        gpu.step()

    graph, _ = capture_graph(captured_step, warmup=0)  # the kernels are loaded: no eager call
    for _ in range(3):
        graph.replay()
        for layer in range(L):
            cpu.record(layer, ids, trusted=True)
        cpu.step()
    torch.cuda.synchronize()
    same(gpu, cpu)
