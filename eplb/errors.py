"""The one exception type eplb raises for misuse it detects."""

__all__ = ["EPLBError", "peer_failure"]


class EPLBError(ValueError):
    """Invalid input or state detected by eplb.

    Messages name the field, the value, the rule and the fix, e.g.
    ``num_physical (300) must be a multiple of num_ranks (32); set num_redundant_experts to 32 or 64``.
    Subclasses ``ValueError`` so generic handlers still catch it.
    """


def peer_failure(
    operation: str, *, step: int | None, rank: int | None, cause: BaseException, who: str | None = None
) -> EPLBError:
    """The `EPLBError` for a collective that failed because a peer rank died, froze or left.

    Args:
        operation: what failed, e.g. ``"the forward's dispatch all-to-all of MoE layer 3"``.
        step: the step it belonged to (None when unknown).
        rank: the rank that failed or stopped answering, where known; else None.
        cause: the backend's exception; raise the result ``from cause`` so it stays chained.
        who: words on who did not answer (`eplb.comm.recovery.GroupHealth.describe`), used
            instead of ``rank`` when given.

    Returns:
        An `EPLBError` with a one-line message naming the step, the operation and the rank.
    """
    at = f"step {step}: " if step is not None else ""
    if who is None:
        who = f"rank {rank} did not answer" if rank is not None else "a peer rank died or stopped answering"
    detail = " ".join(str(cause).split())[:300]
    return EPLBError(
        f"{at}{operation} failed: {who} ({type(cause).__name__}: {detail}). eplb's collectives time out "
        "after async_timeout_s; eplb rebuilds its gloo groups at the next forward or rebalance once every "
        "rank is back (a dead rank: restart every rank and resume from wrapper.state_dict())"
    )
