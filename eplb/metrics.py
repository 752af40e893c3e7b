"""Balancedness metrics: how evenly a load lands on the ranks under a placement.

Legend: L MoE layers, E logical experts, P physical slots, S = P // G slots per rank, G ranks.

A logical expert's load is split evenly over its replicas (the EPLB expert layer spreads the
tokens of an expert evenly over its slots), and a rank's load is the sum over its slots. Per
layer, balancedness is ``mean_g / max_g`` of the rank loads, in (0, 1]; 1 is perfect. The
aggregate over layers is ``sum_l mean / sum_l max``, so busy layers weigh more than idle ones.
Layers without load count as perfectly balanced; no metric is ever NaN.

All functions work on the CPU in float64 and accept a load on any device.

`PrometheusExporter` publishes a wrapper's numbers (balancedness, rebalances, bytes moved) to
Prometheus through ``prometheus_client`` (optional: ``pip install 'eplb[metrics]'``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eplb.errors import EPLBError
from eplb.placement import Placement

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from eplb.wrapper import EPLBWrapper

__all__ = [
    "Balancedness",
    "BalancednessLogger",
    "PrometheusExporter",
    "balancedness",
    "compute_stats",
    "stats_of",
    "format_stats",
    "predicted_gain",
    "rank_loads",
    "rank_share",
]

STATS_KEYS = (
    "step",
    "avg_tokens_per_rank",
    "max_tokens_per_rank",
    "balancedness",
    "imbalance",
    "steps_to_next_rebalance",
)
"""Keys of the dict `compute_stats` returns, in log-line order."""


@dataclass(frozen=True, eq=False)
class Balancedness:
    """Balancedness of one load under one placement.

    Attributes:
        per_layer: ``[L]`` float64 — ``mean_g / max_g`` of each layer's rank loads, in (0, 1];
            1.0 for a layer without load.
        per_layer_imbalance: ``[L]`` float64 — ``max_g / mean_g`` (``1 / per_layer``), >= 1.
        aggregate: ``sum_l mean_g / sum_l max_g`` over all layers, in (0, 1]; 1.0 without load.
        imbalance: ``1 / aggregate`` = ``sum_l max_g / sum_l mean_g``, >= 1.
        avg_tokens_per_rank: ``sum_l mean_g`` — (token, expert) pairs the average rank
            computes, summed over layers.
        max_tokens_per_rank: ``sum_l max_g`` — the same for the busiest rank of each layer;
            ``aggregate = avg_tokens_per_rank / max_tokens_per_rank``.
    """

    per_layer: torch.Tensor
    per_layer_imbalance: torch.Tensor
    aggregate: float
    imbalance: float
    avg_tokens_per_rank: float
    max_tokens_per_rank: float


def rank_share(placement: Placement, num_ranks: int) -> torch.Tensor:
    """Fraction of each logical expert's load that lands on each rank.

    Args:
        placement: the placement (``P`` a multiple of ``num_ranks``).
        num_ranks: ``G``.

    Returns:
        ``[L, E, G]`` float64 — replicas of expert ``e`` on rank ``g`` divided by ``logcnt[l, e]``;
        every ``[l, e, :]`` row sums to 1.
    """
    _check_placement(placement)
    L, P, E = placement.num_layers, placement.num_physical, placement.num_logical
    S = placement.slots_per_rank(num_ranks)
    rank_P = torch.arange(P) // S
    # Flat index of (layer, expert of slot, rank of slot) for every slot.
    flat_LP = (torch.arange(L).unsqueeze(1) * E + placement.phy2log) * num_ranks + rank_P
    replicas = torch.zeros(L * E * num_ranks, dtype=torch.float64)
    replicas.index_add_(0, flat_LP.reshape(-1), torch.ones(L * P, dtype=torch.float64))
    return replicas.view(L, E, num_ranks) / placement.logcnt.unsqueeze(-1).to(torch.float64)


def rank_loads(load_LE: torch.Tensor, placement: Placement, num_ranks: int) -> torch.Tensor:
    """Tokens each rank computes in each layer.

    Args:
        load_LE: ``[L, E]`` — tokens per logical expert (any real dtype, any device, >= 0).
        placement: the placement the load is served with.
        num_ranks: ``G``.

    Returns:
        ``[L, G]`` float64 — each expert's load split evenly over its replicas, summed per rank;
        every row sums to the layer's total load.
    """
    load_LE = _check_load(load_LE, placement)
    S = placement.slots_per_rank(num_ranks)
    # Per-slot load: the expert's load divided by its replica count.
    share_LE = load_LE / placement.logcnt.to(torch.float64)
    slot_load_LP = torch.gather(share_LE, 1, placement.phy2log)
    return slot_load_LP.view(placement.num_layers, num_ranks, S).sum(-1)


def balancedness(load_LE: torch.Tensor, placement: Placement, num_ranks: int) -> Balancedness:
    """Balancedness of ``load_LE`` served with ``placement`` on ``num_ranks`` ranks.

    Args:
        load_LE: ``[L, E]`` — tokens per logical expert (>= 0).
        placement: the placement.
        num_ranks: ``G``.

    Returns:
        A `Balancedness`; zero-load layers count as 1.0, never NaN.
    """
    loads_LG = rank_loads(load_LE, placement, num_ranks)
    mean_L = loads_LG.mean(dim=1)
    max_L = loads_LG.amax(dim=1)
    idle_L = max_L <= 0
    # mean <= max holds exactly, but float summation can put mean one ulp above max; clamp.
    per_layer = torch.where(idle_L, 1.0, mean_L / torch.where(idle_L, 1.0, max_L)).clamp(max=1.0)
    sum_mean, sum_max = float(mean_L.sum()), float(max_L.sum())
    aggregate = 1.0 if sum_max <= 0 else min(1.0, sum_mean / sum_max)
    return Balancedness(
        per_layer=per_layer,
        per_layer_imbalance=1.0 / per_layer,
        aggregate=aggregate,
        imbalance=1.0 / aggregate,
        avg_tokens_per_rank=sum_mean,
        max_tokens_per_rank=sum_max,
    )


def predicted_gain(load_LE: torch.Tensor, old: Placement, new: Placement, num_ranks: int) -> float:
    """``balancedness(load, new).aggregate - balancedness(load, old).aggregate``.

    Args:
        load_LE: ``[L, E]`` — tokens per logical expert (>= 0), e.g. the window's load.
        old: the placement in force.
        new: the candidate placement (same ``L``, ``E``, ``P``).
        num_ranks: ``G``.

    Returns:
        A float in ``(-1, 1)``, positive when ``new`` serves the same load more evenly; the
        wrapper skips a rebalance whose gain is below ``EPLBConfig.min_improvement``.
    """
    return balancedness(load_LE, new, num_ranks).aggregate - balancedness(load_LE, old, num_ranks).aggregate


def compute_stats(
    load_LE: torch.Tensor,
    placement: Placement,
    num_ranks: int,
    *,
    step: int | None = None,
    steps_to_next_rebalance: int | None = None,
) -> dict:
    """The numbers of one balancedness log line, as a plain dict (for your own metrics system).

    Args:
        load_LE: ``[L, E]`` — tokens per logical expert (>= 0).
        placement: the placement the load is served with.
        num_ranks: ``G``.
        step: reported as is.
        steps_to_next_rebalance: reported as is.

    Returns:
        ``{"step", "avg_tokens_per_rank", "max_tokens_per_rank", "balancedness", "imbalance",
        "steps_to_next_rebalance"}`` — Python ints/floats (``step`` and
        ``steps_to_next_rebalance`` as given, possibly None).
    """
    return stats_of(
        balancedness(load_LE, placement, num_ranks), step=step, steps_to_next_rebalance=steps_to_next_rebalance
    )


def stats_of(b: Balancedness, *, step: int | None = None, steps_to_next_rebalance: int | None = None) -> dict:
    """`compute_stats` from an already computed `Balancedness` (so callers that also need its
    per-layer values compute it once)."""
    return {
        "step": step,
        "avg_tokens_per_rank": b.avg_tokens_per_rank,
        "max_tokens_per_rank": b.max_tokens_per_rank,
        "balancedness": b.aggregate,
        "imbalance": b.imbalance,
        "steps_to_next_rebalance": steps_to_next_rebalance,
    }


def format_stats(stats: dict) -> str:
    """One log line from a `compute_stats` dict: ``key=value`` pairs, None values left out.

    >>> format_stats({"step": 3, "balancedness": 0.5, "steps_to_next_rebalance": None})
    'step=3 balancedness=0.5000'
    """
    parts = []
    for key in (*STATS_KEYS, *sorted(set(stats) - set(STATS_KEYS))):
        value = stats.get(key)
        if value is None:
            continue
        if key in ("balancedness", "imbalance"):
            parts.append(f"{key}={value:.4f}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.1f}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class BalancednessLogger:
    """Logs the balancedness of the last step, on rank 0, every ``interval`` steps.

    Call it once per step on **every** rank, after ``tracker.step()``::

        stats = logger(step, tracker, placement, group, steps_to_next_rebalance)

    On a step that is not a multiple of ``interval`` it returns None at once: no communication,
    no host sync. On a logging step it all-reduces ``tracker.last_step_load()`` over ``group``
    (a collective, hence "every rank"; ``group=None`` uses this process's load alone), computes
    `compute_stats` with the current placement, logs `format_stats` at INFO through
    ``logging.getLogger("eplb")`` on ``rank == 0`` only, and returns the dict on every rank
    (also kept as ``last_stats``).

    The last step's load under the current placement is what the ranks actually computed
    (placements change only at step boundaries), so the line reports the realised balance, not
    the window's.

    Args:
        interval: log every ``interval`` steps (>= 1); steps count from 1.
        num_ranks: ``G`` of the placement (the expert-parallel ranks).
        rank: this process's rank; only rank 0 writes the log line.
        logger: where to log; defaults to ``logging.getLogger("eplb")``.
    """

    def __init__(self, interval: int, num_ranks: int, rank: int = 0, *, logger: logging.Logger | None = None):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise EPLBError(f"interval ({interval!r}) must be an int >= 1")
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise EPLBError(f"num_ranks ({num_ranks!r}) must be an int >= 1")
        self.interval = interval
        self.num_ranks = num_ranks
        self.rank = rank
        self.logger = logger if logger is not None else logging.getLogger("eplb")
        self.last_stats: dict | None = None

    def should_log(self, step: int) -> bool:
        """True on the steps that log (``step > 0`` and ``step % interval == 0``)."""
        return step > 0 and step % self.interval == 0

    def __call__(
        self,
        step: int,
        tracker,
        placement: Placement,
        group=None,
        steps_to_next_rebalance: int | None = None,
    ) -> dict | None:
        """Log if ``step`` is a logging step; return the stats dict then, else None."""
        if not self.should_log(step):
            return None
        load_LE = tracker.last_step_load(group=group)
        stats = compute_stats(
            load_LE, placement, self.num_ranks, step=step, steps_to_next_rebalance=steps_to_next_rebalance
        )
        self.last_stats = stats
        if self.rank == 0:
            self.logger.info(format_stats(stats))
        return stats


class PrometheusExporter:
    """Publish an `EPLBWrapper`'s numbers to Prometheus (needs ``prometheus_client``:
    ``pip install 'eplb[metrics]'``).

    `update` (call it on the thread that runs the model, every few steps: it reads the
    tracker's window, a host sync on a GPU) takes a snapshot of ``wrapper.stats()``; a scrape
    serves the latest snapshot, so the scraping thread never touches the model. Metrics, each
    labelled with the EP ``rank`` (every rank exports its own window; no collective):

    ========================================  =======  ============================================
    ``<prefix>_balancedness``                 gauge    window balancedness, sum mean / sum max over layers
    ``<prefix>_layer_balancedness{layer}``    gauge    window balancedness of each MoE layer
    ``<prefix>_steps_total``                  counter  steps since wrapping
    ``<prefix>_rebalances_total``             counter  rebalances committed (skipped ones not counted)
    ``<prefix>_bytes_moved_total``            counter  bytes of expert weights moved between ranks
    ``<prefix>_last_rebalance_seconds``       gauge    wall time of the last rebalance
    ========================================  =======  ============================================

    Args:
        wrapper: the `EPLBWrapper`.
        registry: the ``prometheus_client`` registry to register with (default: its global
            ``REGISTRY``, what ``prometheus_client.start_http_server`` serves).
        prefix: metric name prefix.

    Raises:
        EPLBError: ``prometheus_client`` is not installed, or ``prefix`` is not a valid metric name.
    """

    def __init__(self, wrapper: EPLBWrapper, *, registry: CollectorRegistry | None = None, prefix: str = "eplb"):
        try:
            import prometheus_client
        except ImportError:
            raise EPLBError(
                "PrometheusExporter needs prometheus_client; install it with pip install 'eplb[metrics]'"
            ) from None
        if not isinstance(prefix, str) or not prefix.replace("_", "a").isalnum() or prefix[:1].isdigit():
            raise EPLBError(f"prefix ({prefix!r}) must be a Prometheus metric name: letters, digits, '_'")
        self.wrapper = wrapper
        self.prefix = prefix
        self.rank = str(getattr(wrapper, "_rank", 0))
        self._snapshot: dict | None = None
        self._registry = registry if registry is not None else prometheus_client.REGISTRY
        self._registry.register(self)

    def update(self) -> dict:
        """Snapshot ``wrapper.stats()`` for the next scrape; returns it."""
        self._snapshot = self.wrapper.stats()
        return self._snapshot

    def close(self) -> None:
        """Unregister from the registry (the metrics disappear from scrapes)."""
        self._registry.unregister(self)

    def describe(self) -> list:  # noqa: D102 - prometheus_client's collector protocol
        return []  # metric names depend on the prefix only; no up-front description needed

    def collect(self):
        """Yield the metric families of the latest snapshot (prometheus_client's collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._snapshot
        if stats is None:
            return
        p, rank = self.prefix, self.rank
        gauge = GaugeMetricFamily(f"{p}_balancedness", "Window balancedness (sum mean / sum max rank load)",
                                  labels=["rank"])
        gauge.add_metric([rank], stats["balancedness"])
        yield gauge
        layers = GaugeMetricFamily(f"{p}_layer_balancedness", "Window balancedness of each MoE layer",
                                   labels=["rank", "layer"])
        for i, value in enumerate(stats["balancedness_per_layer"]):
            layers.add_metric([rank, str(i)], value)
        yield layers
        for name, help_text, value in (
            ("steps", "Steps since wrapping", stats["step"]),
            ("rebalances", "Rebalances committed", stats["num_rebalances"]),
            ("bytes_moved", "Bytes of expert weights moved between ranks", stats["bytes_moved_total"]),
        ):
            counter = CounterMetricFamily(f"{p}_{name}", help_text, labels=["rank"])
            counter.add_metric([rank], value)
            yield counter
        seconds = stats.get("last_rebalance_seconds")
        if seconds is not None:
            last = GaugeMetricFamily(f"{p}_last_rebalance_seconds", "Wall time of the last rebalance",
                                     labels=["rank"])
            last.add_metric([rank], seconds)
            yield last


# ---------------------------------------------------------------------- checks
def _check_placement(placement) -> None:
    if not isinstance(placement, Placement):
        raise EPLBError(
            f"placement must be an eplb.Placement, got {type(placement).__name__}; "
            "build one with Placement.from_phy2log or Placement.initial"
        )


def _check_load(load_LE, placement: Placement) -> torch.Tensor:
    """``load_LE`` as a validated ``[L, E]`` float64 CPU tensor."""
    _check_placement(placement)
    load_LE = torch.as_tensor(load_LE)
    if load_LE.dtype.is_complex or load_LE.dtype == torch.bool:
        raise EPLBError(f"load must hold real token counts, got dtype {load_LE.dtype}")
    load_LE = load_LE.detach().to("cpu", torch.float64)
    expect = (placement.num_layers, placement.num_logical)
    if tuple(load_LE.shape) != expect:
        raise EPLBError(
            f"load has shape {tuple(load_LE.shape)} but the placement is [L, E] = {list(expect)}; "
            "pass one row of per-logical-expert loads per MoE layer"
        )
    if not bool(torch.isfinite(load_LE).all()):
        raise EPLBError("load holds NaN or infinite values; loads are token counts")
    if load_LE.numel() and float(load_LE.min()) < 0:
        low = float(load_LE.min())
        raise EPLBError(f"load holds a negative value ({low}); loads are token counts (>= 0)")
    return load_LE
