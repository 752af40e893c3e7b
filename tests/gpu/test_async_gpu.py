"""GPU checks of async EPLB (run on a CUDA machine; skipped elsewhere):

- transfers run on the worker's side stream: the main stream never waits for them;
- a CUDA graph that captured the wrapped model keeps giving correct outputs across commits,
  without re-capture (weights and maps are updated in place);
- ``torch.cuda.set_sync_debug_mode("error")`` raises nothing on the main thread during steps
  that commit.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eplb import EPLBConfig, EPLBWrapper
from eplb.executor import AsyncExecutor
from eplb.moe.slot_layer import SlotStorage
from eplb.placement import Placement
from eplb.planner import Decision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class DenseSwiGLUExperts(nn.Module):
    """Stacked SwiGLU experts computed pair by pair with gathered weights: static shapes, no
    host sync, so the forward can be captured in a CUDA graph (fine for decode-sized batches)."""

    eplb_combine_order = "topk"

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * hidden**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, inter) * inter**-0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        T, K = top_k_index.shape
        ids_M = top_k_index.reshape(-1)
        x_MD = hidden_states.repeat_interleave(K, dim=0)
        h = torch.bmm(self.gate_up_proj[ids_M], x_MD.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y_MD = torch.bmm(self.down_proj[ids_M], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y_MD.view(T, K, -1) * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, hot: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight[hot] += 3.0  # skewed routing, so rebalances move experts
        self.experts = DenseSwiGLUExperts(num_experts, hidden, inter)

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        return x + self.experts(x, ids, (w / w.sum(-1, keepdim=True)).to(x.dtype))


def _model(num_layers=3, hidden=64, inter=96, num_experts=8, top_k=2):
    torch.manual_seed(0)
    return nn.Sequential(*[Block(hidden, inter, num_experts, top_k, hot=i % num_experts)
                           for i in range(num_layers)]).cuda().eval()


def test_cuda_graph_stays_correct_across_async_commits_without_recapture():
    reference = _model()
    wrapper = EPLBWrapper(copy.deepcopy(reference), EPLBConfig(num_redundant_experts=4, step_interval=10_000))
    static_x = torch.ones(16, 64, device="cuda") + 0.1 * torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                wrapper(static_x)  # eager warm-up steps fill the load window
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = wrapper.module(static_x)
        steps_before = wrapper.steps
        old = wrapper.placement
        wrapper.rebalance()
        replays = 0
        debug = torch.cuda.get_sync_debug_mode()
        while wrapper.async_in_flight or replays < 3:
            static_x.copy_(torch.randn(16, 64, device="cuda") + 1.0)
            torch.cuda.set_sync_debug_mode("error")
            try:
                graph.replay()
                wrapper.step()  # commits happen here, between replays, with no host sync
            finally:
                torch.cuda.set_sync_debug_mode(debug)
            torch.testing.assert_close(static_out, reference(static_x))
            replays += 1
            assert replays < 1000
    assert wrapper.steps == steps_before + replays
    assert not wrapper.placement.equals(old), "the rebalance must have moved experts"
    wrapper.close()


class _Layer(SlotStorage):
    def __init__(self, index, S, numel):
        self.layer_index = index
        self.w = torch.zeros(S, numel, device="cuda")
        self.streams = []

    def slot_tensors(self):
        return {"w": self.w}


def test_transfers_run_on_the_side_stream_and_the_main_stream_does_not_wait():
    L, S, numel = 4, 4, 32 * 2**20  # 512 MiB per layer in fp32
    host = torch.randn(S, numel).pin_memory()
    layers = [_Layer(i, S, numel) for i in range(L)]
    old = Placement.from_phy2log(torch.tensor([list(range(S))] * L), S)
    new = Placement.from_phy2log(torch.tensor([[(s + 1) % S for s in range(S)]] * L), S)
    done_events = []

    def transfer(layer, plan, slot_tensors, staging):
        layer.streams.append(torch.cuda.current_stream())
        for _ in range(4):  # slow on purpose: several passes over host memory
            for c in plan.changed_local:
                staging["w"][c].copy_(host[(c + 1) % S], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        done_events.append(ev)

    ex = AsyncExecutor(rank=0, num_ranks=1, communicator=None, max_transfer_bytes=1 << 30, timeout_s=120,
                       transfer_fn=transfer)
    main = torch.cuda.current_stream()
    a = torch.randn(256, 256, device="cuda")
    ex.begin(layers, old, lambda: Decision.move_to(new))
    overlapped = 0
    while ex.in_flight:
        ex.on_step()
        (a @ a).sum()
        main.synchronize()  # the main stream alone
        if done_events and not done_events[-1].query():
            overlapped += 1  # main-stream work finished while a transfer was still running
        time.sleep(0.001)
    torch.cuda.synchronize()
    assert all(s != main and s == layers[0].streams[0] for layer in layers for s in layer.streams)
    assert overlapped > 0
    for layer in layers:
        for s in range(S):
            assert torch.equal(layer.w[s].cpu(), host[(s + 1) % S])
