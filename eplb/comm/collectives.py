"""The few collectives several modules share: sum, gather rows, agree.

Legend: L layers, E logical experts, S slots on one rank, G ranks.

Only NCCL reduces accelerator tensors reliably; every other backend (gloo) gets a CPU copy and
the result is copied back. `stages_through_host` is the one place that decides.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from eplb.errors import EPLBError

__all__ = ["stages_through_host", "all_reduce_sum", "all_gather_rows", "agree"]


def stages_through_host(t: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """True when a collective over ``group`` must run on a CPU copy of ``t`` (``t`` on the CPU,
    or a backend other than NCCL)."""
    return t.device.type == "cpu" or "nccl" not in str(dist.get_backend(group)).lower()


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``t`` (any shape, e.g. ``load_LE``) over ``group``; the result is on ``t``'s device and
    ``t`` is not modified. Raises `EPLBError` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise EPLBError(
            "a process group was passed but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first, or pass group=None"
        )
    if stages_through_host(t, group):
        staged = t.to("cpu", copy=True)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
        return staged.to(t.device)
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_rows(t_S: torch.Tensor, group: dist.ProcessGroup, num_ranks: int) -> torch.Tensor:
    """``[S, ...]`` from every rank -> ``[G * S, ...]`` in rank order, on ``t_S``'s device. Staged
    through the host, the rows travel as bytes (gloo lacks dtypes such as float8)."""
    host = stages_through_host(t_S, group)
    src = t_S.detach().to("cpu").contiguous().view(torch.uint8) if host else t_S.contiguous()
    parts = [torch.empty_like(src) for _ in range(num_ranks)]
    dist.all_gather(parts, src, group=group)
    out = torch.cat(parts)
    return (out.view(t_S.dtype) if host else out).to(t_S.device)


def agree(group: dist.ProcessGroup, *, at_most: dict[str, int], at_least: dict[str, int]) -> dict[str, int]:
    """One all-reduce of a few CPU integers: MAX over the ranks of every ``at_least`` value (a
    flag raised on any rank) and MIN of every ``at_most`` value (a count reached on every rank).

    ``group`` must reduce CPU tensors (gloo). Returns ``{name: agreed value}``; the backend's
    exception propagates when a peer does not answer within the group's timeout.
    """
    names = [*at_least, *at_most]
    # MAX of the negated values is the MIN: one MAX all-reduce serves both.
    t = torch.tensor([*at_least.values(), *(-v for v in at_most.values())], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    values = t.tolist()
    return {n: (v if i < len(at_least) else -v) for i, (n, v) in enumerate(zip(names, values))}
