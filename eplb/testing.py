"""Helpers that eplb's GPU tests and benchmarks share, and that your own checks may use.

`capture_graph` is the CUDA-graph capture recipe of ``torch.cuda.graphs``' documentation (and of
docs/guide/fast-forward.md): warm up on a side stream, then capture one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["capture_graph"]


def capture_graph(
    fn: Callable[[], Any], *, warmup: int = 2, before_capture: Callable[[], None] | None = None,
    device: torch.device | str | int | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` in a CUDA graph after ``warmup`` eager calls on a side stream.

    The warm-up lets ``fn`` allocate what it keeps (a dispatcher's buffers, the replica choice's
    caches) at its final size before the capture; each warm-up call is a real call (a wrapped
    model counts it as a step). Run it under ``torch.no_grad()`` when ``fn`` runs a model: grad
    mode is the caller's.

    Args:
        fn: the work to capture, called with no arguments; it reads and writes static tensors.
        warmup: eager calls before the capture (>= 0).
        before_capture: called on the current stream after the warm-up, before the capture
            (e.g. ``tracker.reset`` to forget the warm-up's load).
        device: the CUDA device of the streams; default the current one.

    Returns:
        ``(graph, out)``: replay with ``graph.replay()``; ``out`` is what ``fn`` returned during
        the capture, whose tensors every replay rewrites in place. The device is synchronised
        before returning.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out
