"""The one exception type eplb raises for misuse it detects."""

__all__ = ["EPLBError", "peer_failure"]


class EPLBError(ValueError):
    """Invalid input or state detected by eplb.

    Messages name the field, the value, the rule and the fix, e.g.
    ``num_physical (300) must be a multiple of num_ranks (32); set num_redundant_experts to 32 or 64``.
    Subclasses ``ValueError`` so generic handlers still catch it.
    """


def peer_failure(operation: str, *, step: int | None, rank: int | None, cause: BaseException) -> EPLBError:
    """The `EPLBError` for a collective that failed because a peer rank died, froze or left.

    Args:
        operation: what failed, e.g. ``"the forward's dispatch all-to-all of MoE layer 3"``.
        step: the step it belonged to (None when unknown).
        rank: the rank that failed or stopped answering, where known; else None.
        cause: the backend's exception; raise the result ``from cause`` so it stays chained.

    Returns:
        An `EPLBError` with a one-line message naming the step, the operation and the rank.
    """
    at = f"step {step}: " if step is not None else ""
    who = f"rank {rank} did not answer" if rank is not None else "a peer rank died or stopped answering"
    detail = " ".join(str(cause).split())[:300]
    return EPLBError(
        f"{at}{operation} failed: {who} ({type(cause).__name__}: {detail}). eplb's collectives time out "
        "after async_timeout_s; the process group cannot be used after this: restart every rank "
        "(resume from wrapper.state_dict())"
    )
