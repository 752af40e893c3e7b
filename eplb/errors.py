"""The one exception type eplb raises for misuse it detects."""

__all__ = ["EPLBError"]


class EPLBError(ValueError):
    """Invalid input or state detected by eplb.

    Messages name the field, the value, the rule and the fix, e.g.
    ``num_physical (300) must be a multiple of num_ranks (32); set num_redundant_experts to 32 or 64``.
    Subclasses ``ValueError`` so generic handlers still catch it.
    """
