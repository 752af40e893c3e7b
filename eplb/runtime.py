"""The runtime seam: a frozen `Topology` (who the ranks are) and `build_runtime`, the one place
that turns a topology and an `EPLBConfig` into the parts that run: tracker, dispatcher,
communicator and executor.

A new communicator, or re-building for another set of ranks, goes through here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb.comm.base import Communicator, bound_group_timeout, dedicated_group, select_communicator
from eplb.comm.recovery import GroupHealth, new_gloo_group
from eplb.config import EPLBConfig
from eplb.errors import EPLBError
from eplb.executor import AsyncExecutor, Executor, SyncExecutor
from eplb.moe.dispatch import Dispatcher, make_dispatcher
from eplb.tracker import LoadTracker

__all__ = ["Topology", "Runtime", "build_runtime", "build_executor", "rebuild_groups"]

logger = logging.getLogger("eplb")


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The expert-parallel group as the library sees it.

    Attributes:
        group: the EP process group, or None for one process (or an offline topology).
        rank: this process's rank in the group (``0 .. G-1``).
        num_ranks: ``G``.
        num_nodes: ``N``, hosts the ranks span (``G % N == 0``; hierarchical policies use it).
        control_group: a gloo group over the same ranks for the executors' commit agreements
            (async: at every step boundary; sync: before each layer's commit; never an NCCL
            forward group); None until `build_runtime` creates it. Its timeout is
            ``async_timeout_s``.
        forward_group: the group as given, kept with one rank too: the fixed-capacity dispatcher
            runs the expert-parallel forward over it (a group of one checks that code path). With
            a gloo EP group of several ranks the forward runs on the control group instead (see
            `Runtime.collective_group`).
    """

    group: dist.ProcessGroup | None = None
    rank: int = 0
    num_ranks: int = 1
    num_nodes: int = 1
    control_group: dist.ProcessGroup | None = None
    forward_group: dist.ProcessGroup | None = None

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None, num_nodes: int = 1) -> Topology:
        """This process's place in ``group`` (None: one process). A group of one rank is kept as
        None: nothing communicates. Raises `EPLBError` when ``group`` is given but
        torch.distributed is not initialised."""
        if group is None:
            return cls(num_nodes=num_nodes)
        if not (dist.is_available() and dist.is_initialized()):
            raise EPLBError(
                "ep_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (or pass ep_group=None for one process)"
            )
        num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        return cls(
            group=group if num_ranks > 1 else None, rank=rank, num_ranks=num_ranks, num_nodes=num_nodes,
            forward_group=group,
        )

    @classmethod
    def offline(cls, num_ranks: int, num_nodes: int = 1) -> Topology:
        """``num_ranks`` ranks on ``num_nodes`` nodes without processes (planning, simulation)."""
        return cls(num_ranks=num_ranks, num_nodes=num_nodes)


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """The parts `build_runtime` created for one topology."""

    topology: Topology
    tracker: LoadTracker
    dispatcher: Dispatcher | None
    communicator: Communicator
    executor: Executor
    collective_group: dist.ProcessGroup | None = None
    """The group of eplb's main-thread collectives (the forward's dispatch/combine all-to-all,
    the load all-reduces): with a gloo EP group, the control group, whose timeout is
    ``async_timeout_s``, so a dead or frozen peer makes them raise within it instead of after the
    EP group's own timeout (30 minutes by torch's default); with an NCCL EP group, the EP group
    itself, whose timeout `build_runtime` sets to ``async_timeout_s`` (NCCL's watchdog enforces
    it). None for one process."""


def build_runtime(
    topology: Topology,
    config: EPLBConfig,
    *,
    num_layers: int,
    num_logical: int,
    device: torch.device,
    health: GroupHealth | None = None,
) -> Runtime:
    """Create tracker, dispatcher, communicator and executor for ``topology`` and ``config``.

    Args:
        topology: from `Topology.from_group`.
        config: the `EPLBConfig`.
        num_layers: ``L`` (the tracker's window is ``[W, L, E]``).
        num_logical: ``E``.
        device: the experts' device (the tracker's and the communicator's).
        health: the `eplb.comm.recovery.GroupHealth` a failed collective on eplb's gloo groups
            marks broken (the wrapper then rebuilds them with `rebuild_groups`); None: not tracked.

    Returns:
        A `Runtime`; its ``topology`` has the control group the async executor uses.

    Creating communicators and groups is collective: every rank of the job calls this at the
    same time.
    """
    group = topology.group
    tracker = LoadTracker(num_layers, num_logical, config.window_size, device)
    gloo = group is not None and "gloo" in str(dist.get_backend(group)).lower()
    if group is not None and topology.control_group is None:
        topology = dataclasses.replace(
            topology, control_group=dedicated_group(group, "gloo", config.async_timeout_s)
        )
    # On a gloo EP group the forward's collectives share the control group: the main thread issues
    # both, in the same order on every rank, and the group's timeout is async_timeout_s. On any
    # other EP group (NCCL) they run on the user's group, whose timeout becomes async_timeout_s.
    collective_group = topology.control_group if gloo else group
    if group is not None and not gloo:
        _bound_forward_group(group, config.async_timeout_s, topology.rank)
    dispatcher = make_dispatcher(
        collective_group if gloo else topology.forward_group,
        kind=config.dispatcher, max_tokens_per_rank=config.max_tokens_per_rank,
    )
    if gloo and dispatcher is not None:
        dispatcher.health = health
    communicator, executor = build_executor(topology, config, device, health)
    return Runtime(topology=topology, tracker=tracker, dispatcher=dispatcher, communicator=communicator,
                   executor=executor, collective_group=collective_group)


def build_executor(
    topology: Topology, config: EPLBConfig, device: torch.device, health: GroupHealth | None = None
) -> tuple[Communicator, Executor]:
    """The communicator and executor ``config`` asks for on ``topology`` (whose control group
    `build_runtime` created with several ranks). Collective: it creates groups."""
    group = topology.group
    communicator = select_communicator(
        config.communicator, use_async=config.use_async, device=device, group=group,
        timeout_s=config.async_timeout_s,
    )
    if not config.use_async:
        executor: Executor = SyncExecutor(
            rank=topology.rank, num_ranks=topology.num_ranks, communicator=communicator,
            max_transfer_bytes=config.max_transfer_bytes, control_group=topology.control_group, health=health,
        )
    else:
        executor = AsyncExecutor(
            rank=topology.rank,
            num_ranks=topology.num_ranks,
            communicator=communicator,
            max_transfer_bytes=config.max_transfer_bytes,
            timeout_s=config.async_timeout_s,
            layers_per_step=config.async_layers_per_step,
            on_error=config.async_on_error,
            control_group=topology.control_group,
            health=health,
        )
    return communicator, executor


def _bound_forward_group(group: dist.ProcessGroup, timeout_s: float, rank: int) -> None:
    if bound_group_timeout(group, timeout_s):
        if rank == 0:
            logger.info("the EP group's collectives now time out after async_timeout_s (%s s)", timeout_s)
    elif rank == 0:
        logger.warning(
            "this PyTorch cannot change the EP group's timeout: create the group with "
            "timeout=datetime.timedelta(seconds=async_timeout_s) so the forward's collectives are bounded"
        )


def rebuild_groups(runtime: Runtime, health: GroupHealth, prefix: str) -> Runtime:
    """New gloo groups in place of eplb's broken ones, after a peer stopped answering: the
    control group (the forward's collectives too, with a gloo EP group) and the communicator's
    gloo group (a new communicator of the same kind; a worker still running keeps the old one).

    Every rank calls it at the same time, after `eplb.comm.recovery.GroupHealth.meet` returned
    ``prefix`` (the new groups' names start with it). The user's EP group is not touched: an NCCL
    EP group whose collective failed cannot be rebuilt here. Creating a group waits at most
    ``health.timeout_s`` for the other ranks; the backend's error propagates after that.
    Returns the new `Runtime` (the dispatcher and the executor are updated in place).
    """
    topology = runtime.topology
    ranks = dist.get_process_group_ranks(topology.group)
    old_control = topology.control_group
    control = new_gloo_group(ranks, f"{prefix}/control", health.timeout_s) if old_control is not None else None
    communicator = runtime.communicator
    if getattr(communicator, "_pg", None) is not None:  # torch_gloo, torch_p2p: a dedicated gloo group
        gloo = new_gloo_group(ranks, f"{prefix}/transfer", health.timeout_s)
        communicator = type(communicator)(
            group=communicator.group, device=communicator.device, timeout_s=communicator.timeout_s, gloo_group=gloo
        )
    dispatcher = runtime.dispatcher
    if dispatcher is not None and old_control is not None and getattr(dispatcher, "group", None) is old_control:
        runtime.dispatcher.group = control
    runtime.executor.replace_groups(control, communicator)
    collective = control if runtime.collective_group is old_control else runtime.collective_group
    return dataclasses.replace(
        runtime, topology=dataclasses.replace(topology, control_group=control), communicator=communicator,
        collective_group=collective,
    )
