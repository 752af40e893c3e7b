"""`EPLBWrapper`: wrap any MoE model so its experts are load-balanced, without changing its outputs.

Legend: L MoE layers, E logical experts, P = E + num_redundant_experts physical slots, G ranks,
S = P // G slots per rank.

The wrapper finds the MoE layers (`eplb.moe.find_moe_layers`), builds the runtime for its
topology (`eplb.runtime.build_runtime`: tracker, dispatcher, communicator, executor), replaces
each experts module by an `eplb.moe.EPLBExperts` holding this rank's slots, counts steps with a
forward hook on the model, and every ``step_interval`` steps hands the tracker's window to the
executor with the planner (`eplb.planner.plan`) to decide the new placement. The layers hold the
committed placement; the wrapper's `placement` is read back from them after each outcome.
Everything that can be wrong with the inputs is checked before the model is modified.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import logging
import os
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch import nn

from eplb.atomic import critical_section
from eplb.checkpoint import LoadReport, LogicalLoader, resolve_device
from eplb.comm.base import CommunicationError
from eplb.comm.collectives import agree
from eplb.comm.recovery import BoundedStore, GroupHealth, NotEveryRank, missing_ranks_error, rendezvous
from eplb.config import EPLBConfig
from eplb.errors import EPLBError, peer_failure
from eplb.executor import RebalanceReport, StepOutcome
from eplb.executor.staging import placement_of
from eplb.metrics import BalancednessLogger, balancedness, stats_of
from eplb.moe import EPLBExperts, find_moe_layers
from eplb.moe.adapters import direct_tensors
from eplb.moe.layer import not_copyable_message
from eplb.placement import Placement, _redundant_fixes
from eplb.planner import Decision, PlanOptions, plan, skip_empty_window
from eplb.policies import check_policy_inputs, check_policy_options, get_policy
from eplb.runtime import Runtime, Topology, build_executor, build_runtime, rebuild_groups
from eplb.traces import LoadRecorder, Trace
from eplb.tracker import check_num_valid_tokens, check_window_size

__all__ = ["EPLBWrapper"]

logger = logging.getLogger("eplb")

_FORMAT = "eplb.wrapper"
_VERSION = 1
_GROUP_ATTRS = ("n_group", "num_expert_group")  # model-config names of DeepSeek-style expert groups


class EPLBWrapper:
    """Expert-parallel load balancing for an ``nn.Module`` MoE model.

    Args:
        model: the model; its MoE layers are found by structure (see `eplb.register_adapter`
            for layouts the built-in adapters do not know). Modified in place: its experts
            modules are replaced (`unwrap` restores them).
        config: an `EPLBConfig` (defaults when None).
        ep_group: the expert-parallel process group (``G`` ranks), or None for one process.
            Every rank wraps the same model; rank ``r`` keeps only slots ``[r*S, (r+1)*S)``.
        num_nodes: hosts the ranks span (for hierarchical policies; ``G % num_nodes == 0``).
        num_groups: expert groups of group-limited routing; None takes the model config's
            ``n_group`` (DeepSeek) when it has one, else 1. A value that contradicts the model
            config raises `EPLBError`.
        initial_placement: a `Placement` (or a path to one saved with ``Placement.save``) to
            start from instead of ``Placement.initial``.
        record_trace: path of a ``.npz`` trace that records the load of every step (summed over
            the ranks, written by rank 0), as ``start_recording(record_trace)`` right after wrapping;
            finished by `close`, `stop_recording`, or at interpreter exit.
        device: for a model whose parameters are on the ``meta`` device (see
            `eplb.meta_parameters`): the device of this rank. Its non-expert tensors are
            materialised there (empty) and only its ``S`` slots per layer are allocated; fill
            them with `load_logical_state_dict` before the first forward (which raises
            `EPLBError` until then). Leave it None for a model that holds real weights.

    Use::

        wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, use_async=False))
        out = wrapper(**batch)     # = model(**batch); one step
        wrapper.rebalance()        # force a rebalance from the current window
        wrapper.stats()            # balancedness and the last rebalance

    The wrapper's own names are ``module``, ``eplb_config``, ``tracker``, ``placement``, ``recording``,
    ``eplb_layers``, ``steps`` and the methods below; every other attribute falls through to the
    model (``wrapper.generate(...)``, ``wrapper.config``, ``wrapper.eval()``). Every forward of
    the model is one step, however it is called.
    """

    def __init__(
        self,
        model: nn.Module,
        config: EPLBConfig | None = None,
        ep_group: dist.ProcessGroup | None = None,
        num_nodes: int = 1,
        num_groups: int | None = None,
        initial_placement: Placement | str | os.PathLike | None = None,
        record_trace: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ):
        self.__dict__["module"] = model  # first, so __getattr__ never recurses on a half-built wrapper
        config = EPLBConfig() if config is None else config
        if not isinstance(config, EPLBConfig):
            raise EPLBError(f"config must be an eplb.EPLBConfig, got {type(config).__name__}")
        topology = Topology.from_group(ep_group, num_nodes)
        num_ranks, rank = topology.num_ranks, topology.rank
        # Step 1: find the layers and check everything that can fail, without touching the model.
        # With several ranks, an error on one rank is shared so that every rank raises together
        # and none hangs in the agreement check or, later, in its first forward.
        error: Exception | None = None
        recorder = None
        try:
            specs = find_moe_layers(model)
            num_layers, num_logical = len(specs), specs[0].num_experts
            num_physical = num_logical + config.num_redundant_experts
            num_groups = _resolve_num_groups(model, num_groups)
            _check_sizes(num_layers, num_logical, num_physical, num_groups, num_nodes, num_ranks)
            # P is known only now: a migration budget below 1 / P would let no slot move.
            check_policy_options(config.policy, config.policy_options(), num_physical)
            placement = _initial_placement(
                initial_placement, num_layers, num_logical, num_physical, num_ranks
            )
            found_device = _expert_device(specs)
            device = resolve_device(device, found_device, model, specs)
            loader = LogicalLoader(model, specs)
            check_window_size(config.window_size, num_layers, num_logical)
            recorder = LoadRecorder(
                {"num_layers": num_layers, "num_logical": num_logical, "model": type(model).__name__,
                 "source": "EPLBWrapper"},
                rank=rank,
            )
            if record_trace is not None:
                recorder.start(record_trace)
        except Exception as exc:
            error = exc
        if num_ranks > 1:
            summary = (
                None
                if error
                else {
                    "config": config.model_dump_json(),
                    "num_logical": num_logical,
                    "num_layers": num_layers,
                    "num_physical": num_physical,
                    "num_groups": num_groups,
                    "num_nodes": num_nodes,
                    "placement": placement.phy2log.tolist(),
                }
            )
            # eplb's own bounded connections to the job's store: the agreement, roll calls, rebuilds.
            store = BoundedStore()
            try:
                key = _check_ranks_agree(_error_text(error), summary, ep_group, num_ranks, rank,
                                         config.async_timeout_s, store)
            except BaseException:
                if recorder is not None:
                    recorder.discard()
                if error is not None:
                    raise error from None
                raise
        if error is not None:
            raise error from None

        # Step 2: build the new parts (copies; the model is still untouched). Creating the
        # runtime's communicator and groups is collective.
        # Whether eplb's gloo groups still work on this rank; they are rebuilt after a lost peer.
        health = GroupHealth(key, rank, num_ranks, config.async_timeout_s, store) if num_ranks > 1 else None
        runtime = build_runtime(topology, config, num_layers=num_layers, num_logical=num_logical, device=device,
                                health=health)
        if num_ranks > 1:
            _collect_at_exit()
        self.eplb_config = config
        self._runtime = runtime
        self._topology = runtime.topology
        self._ep_group = topology.group
        self._num_ranks, self._rank = num_ranks, rank
        self._num_nodes, self._num_groups = num_nodes, num_groups
        self._num_layers, self._num_logical, self._num_physical = num_layers, num_logical, num_physical
        self._placement = placement
        self.tracker = runtime.tracker
        # eplb's main-thread collectives (the forward's all-to-all, load all-reduces) run on a group
        # whose timeout is async_timeout_s where the backend allows it (see build_runtime).
        self._collective_group = runtime.collective_group
        self._health = health
        dispatcher = runtime.dispatcher
        self._specs = specs
        self._layers = [
            EPLBExperts(
                spec.experts,
                spec.expert_tensors,
                layer_index=i,
                phy2log=placement.phy2log[i],
                num_ranks=num_ranks,
                rank=rank,
                dispatcher=dispatcher,
                tracker=self.tracker,
                device=device,
                replica_choice=config.replica_choice,
            )
            for i, spec in enumerate(specs)
        ]
        self._executor = runtime.executor
        self._executor.stop_with(self)
        recorder.group = self._collective_group
        self._recorder = recorder
        self._balancedness_logger = _balancedness_logger(config, num_ranks, rank)
        self._steps = 0
        self._num_rebalances = 0
        self._bytes_moved_total = 0
        self._last_report = None
        self._last_gain: float | None = None
        self._closed = False
        self._unwrapped = False
        self._gathered: list[nn.Module] | None = None  # unwrap()'s all-gather, until it ends
        self._in_collectives = False  # inside a sequence of eplb's collectives (see _begin_collectives)

        # Step 3: install (the only step that modifies the model).
        for spec, layer in zip(specs, self._layers):
            setattr(spec.parent, spec.attr, layer)
            if spec.block_forward is not None:
                spec.parent.forward = spec.block_forward
        self._hook = model.register_forward_hook(self._forward_hook)
        self._pre_hook = model.register_forward_pre_hook(self._before_forward)
        self._install_loader(loader, device, experts_on_meta=found_device.type == "meta")
        for spec in specs:
            # unwrap needs only where each layer sits: release the replaced modules (all E experts),
            # so that a rank holds its S slots per layer and nothing more.
            spec.original = spec.experts = None

    # ------------------------------------------------------------------ calling the model
    def __call__(self, *args, **kwargs):
        """Run the model (one step; the step is counted by a forward hook, see the class doc)."""
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only called for names not found on the wrapper: fall through to the model.
        module = self.__dict__.get("module")
        if module is None:
            raise AttributeError(name)
        return getattr(module, name)

    def save_pretrained(self, *args, **kwargs) -> None:
        """Refused: the wrapped model holds physical slots (this rank's ``S`` rows per layer), not
        the logical experts a checkpoint must hold; saving would write slot rows under the logical
        keys' names. Save ``wrapper.unwrap()`` (the logical model) instead.

        Raises:
            EPLBError: always.
        """
        raise EPLBError(
            "save_pretrained on an EPLBWrapper would write physical slots, not the model's logical experts; "
            "call wrapper.unwrap() and save the model it returns (unwrap gathers every logical expert)"
        )

    def __enter__(self) -> EPLBWrapper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the wrapper (or of the wrapped
        model, whose forward hook holds the wrapper) keep: the model, config, placement, tracker
        and counters. The executor (worker thread, streams) and the trace writer are not data:
        the copy gets a fresh executor with no rebalance in flight, starting from the committed
        placement, and records no trace (a file has one writer).

        Raises `EPLBError` with several ranks (see `EPLBExperts.__getstate__`)."""
        if self._num_ranks > 1:
            raise EPLBError(not_copyable_message(self._num_ranks))
        state = dict(self.__dict__)
        state.update(_runtime=None, _executor=None, _recorder=self._recorder.idle_copy(),
                     _public_placement=(None, None))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_gathered": None, **state})
        communicator, executor = build_executor(self._topology, self.eplb_config, self.tracker.device)
        dispatcher = self._layers[0].dispatcher
        self._runtime = Runtime(topology=self._topology, tracker=self.tracker, dispatcher=dispatcher,
                                communicator=communicator, executor=executor)
        self._executor = executor
        self._executor.stop_with(self)

    def __repr__(self) -> str:
        return (
            f"EPLBWrapper({type(self.module).__name__}, L={self._num_layers}, E={self._num_logical}, "
            f"P={self._num_physical}, ranks={self._num_ranks}, step={self._steps})"
        )

    # ------------------------------------------------------------------ state
    @property
    def placement(self) -> Placement:
        """The committed `Placement` of every MoE layer, in model order.

        A copy the wrapper never reads back: editing its tensors changes nothing here. The same
        copy is returned until the placement changes."""
        internal, public = self.__dict__.get("_public_placement", (None, None))
        if internal is not self._placement:
            public = self._placement.clone()
            self.__dict__["_public_placement"] = (self._placement, public)
        return public

    @property
    def eplb_layers(self) -> list:
        """The `eplb.moe.EPLBExperts` layers, in model order."""
        return list(self._layers)

    @property
    def steps(self) -> int:
        """Steps (model forwards) since wrapping."""
        return self._steps

    def stats(self, *, reduce: bool = False, num_ranks: int | None = None) -> dict:
        """Balancedness of the current window under the committed placement, and the last rebalance.

        Args:
            reduce: sum the window over the EP group first (a collective: every rank must call
                it). By default the window of this rank alone is used and nothing communicates.
            num_ranks: a preview for another number of EP ranks ``G`` (e.g. on one process, where
                balancedness is always 1.0): the committed placement's slots laid out over ``G``
                ranks (slot ``s`` on rank ``s // (P // G)``, as a ``G``-rank wrapper would hold them,
                e.g. with a placement planned by ``eplb plan --ranks G``), and ``planned_balancedness``,
                what the configured policy would reach on ``G`` ranks from this window. ``P`` must
                be a multiple of ``G`` (`EPLBError` names the fix). Default: this wrapper's ranks.

        Returns:
            The keys of `eplb.metrics.compute_stats` (``step``, ``avg_tokens_per_rank``,
            ``max_tokens_per_rank``, ``balancedness``, ``imbalance``, ``steps_to_next_rebalance``,
            None with a static placement), plus ``balancedness_per_layer`` (list),
            ``num_rebalances`` (rebalances that moved weights), ``bytes_moved_total``,
            ``last_predicted_gain`` and ``last_rebalance_<field>`` for every
            `eplb.executor.RebalanceReport` field (``layers``, ``slots_changed``,
            ``network_transfers``, ``local_copies``, ``bytes_moved``, ``seconds``, ``skipped``,
            ``reason``); with ``num_ranks``, also ``num_ranks`` and ``planned_balancedness``
            (None without load).

            Before the first rebalance (done, skipped or aborted) every ``last_rebalance_<field>``
            and ``last_predicted_gain`` is None — ``last_rebalance_skipped`` too, not False — while
            ``num_rebalances`` and ``bytes_moved_total`` are 0. A skipped or aborted rebalance
            sets them (``last_rebalance_skipped`` True, ``last_rebalance_reason`` says why);
            ``last_predicted_gain`` stays None until a policy has planned.
        """
        ranks = self._num_ranks if num_ranks is None else _preview_ranks(num_ranks, self._num_physical,
                                                                          self._num_logical)
        if reduce:
            with self._collective_sequence():
                load_LE = self._collective("the load all-reduce of stats(reduce=True)", self.tracker.window_load,
                                           self._collective_group)
        else:
            load_LE = self.tracker.window_load(group=None)
        b = balancedness(load_LE, self._placement, ranks)
        out = stats_of(b, step=self._steps, steps_to_next_rebalance=self._steps_to_next_rebalance())
        out["balancedness_per_layer"] = b.per_layer.tolist()
        out["num_rebalances"] = self._num_rebalances
        out["bytes_moved_total"] = self._bytes_moved_total
        out["last_predicted_gain"] = self._last_gain
        report = asdict(self._last_report) if self._last_report is not None else {}
        for f in fields(RebalanceReport):
            out[f"last_rebalance_{f.name}"] = report.get(f.name)
        if num_ranks is not None:
            out["num_ranks"] = ranks
            out["planned_balancedness"] = None
            if bool((load_LE > 0).any()):
                planned = get_policy(self.eplb_config.policy)(
                    load_LE, num_physical=self._num_physical, num_groups=self._num_groups,
                    num_nodes=self._num_nodes if ranks % self._num_nodes == 0 else 1, num_ranks=ranks,
                )
                out["planned_balancedness"] = balancedness(load_LE, planned, ranks).aggregate
        return out

    def state_dict(self) -> dict:
        """Placement, tracker window, step count and this rank's slot weights (CPU copies)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_ranks": self._num_ranks,
            "rank": self._rank,
            "steps": self._steps,
            "placement": self._placement.to_dict(),
            "tracker": self.tracker.state_dict(),
            "slots": [
                {n: t.to("cpu", copy=True) for n, t in layer.slot_tensors().items()} for layer in self._layers
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (same model, config and ranks): placement, slot weights, tracker.

        Everything is validated first (format, sizes, the placement, every slot tensor's name,
        shape and dtype — no casts — and the tracker state); a bad state raises `EPLBError` and
        changes nothing. Then all of it is applied at once (atomic under ``KeyboardInterrupt``,
        see `eplb.atomic`).

        With several ranks it is collective: every rank calls it with the state it saved at the
        same step. One agreement on eplb's control group decides, and every rank applies or none
        does: a rank that does not arrive within ``async_timeout_s`` (interrupted, failed, not
        loading) makes the others raise `EPLBError` with nothing loaded, and states whose
        placements or step counts differ raise `EPLBError` on every rank, nothing loaded.

        Args:
            state: a dict from `state_dict` (``placement``: the ``[L, P]`` ``phy2log`` and its
                maps; ``slots``: this rank's slot tensors per layer, ``[S_local, ...]`` with the
                model's dtypes; ``tracker``: the `eplb.tracker.LoadTracker` state; ``steps``).

        Raises:
            EPLBError: the wrapper is closed or an async rebalance is in flight (call
                ``synchronize()`` first); a wrong format or version, sizes, placement, slot
                name, shape or dtype, or tracker state (nothing changed); with several ranks, a
                peer that did not arrive within ``async_timeout_s`` (plus at most 1 s of roll
                call) or states saved at different steps (nothing loaded on any rank).
        """
        self._check_open()
        if self.async_in_flight:
            raise EPLBError("an async rebalance is in flight; call synchronize() before load_state_dict()")
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise EPLBError(
                f'state is not an EPLBWrapper state_dict (expected "format": "{_FORMAT}"); to load the '
                "unwrapped model's weights use wrapper.load_logical_state_dict(state)"
            )
        if state.get("version") != _VERSION:
            raise EPLBError(
                f"EPLBWrapper state has version {state.get('version')!r}; this eplb reads {_VERSION}"
            )
        if (state.get("num_ranks"), state.get("rank")) != (self._num_ranks, self._rank):
            raise EPLBError(
                f"state was saved by rank {state.get('rank')} of {state.get('num_ranks')} ranks; this "
                f"wrapper is rank {self._rank} of {self._num_ranks} (each rank loads its own state)"
            )
        # Step 1: validate and stage everything.
        placement = Placement.from_dict(state.get("placement"), source="EPLBWrapper state placement")
        _check_placement_shape(placement, self._num_layers, self._num_logical, self._num_physical)
        placement.validate(self._num_ranks)
        tracker_state = self.tracker.stage_state_dict(state.get("tracker"))
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise EPLBError(f"EPLBWrapper state field 'steps' ({steps!r}) must be an int >= 0")
        slots = state.get("slots")
        if not isinstance(slots, (list, tuple)) or len(slots) != len(self._layers):
            got = f"{len(slots)} layers" if isinstance(slots, (list, tuple)) else type(slots).__name__
            raise EPLBError(f"state has slots of {got}; the model has {len(self._layers)} MoE layers")
        all_slots = torch.arange(self._num_physical // self._num_ranks)
        commits = []
        for layer, saved in zip(self._layers, slots):
            _check_saved_slots(layer, saved)
            row = placement.phy2log[layer.layer_index]
            commits.append((layer, layer.prepare_commit(row, slots=all_slots, staged=saved), saved))
        def apply() -> None:
            self.tracker.apply_staged_state(tracker_state)
            for layer, prepared, saved in commits:
                layer.apply_commit(prepared, saved)
            self._placement = placement
            self._steps = steps

        # Step 2: apply, all at once.
        if self._num_ranks == 1:
            with critical_section():
                apply()
            return
        # Several ranks: every rank applies a state with the same placement and step count, or
        # none does (a rank interrupted before this point, or not loading at all, would otherwise
        # route tokens by other maps than its peers'). One agreement on the control group and the
        # apply form one critical section, as a sync rebalance's commit does.
        digest = _state_digest(placement, steps)
        with self._collective_sequence(), critical_section():
            try:
                agreed = agree(self._topology.control_group, at_least={"highest": digest}, at_most={"lowest": digest})
            except RuntimeError as exc:  # a peer did not load (interrupted, failed, gone) within the timeout
                who = self._health.describe(self._health.lost()) if self._health is not None else None
                raise peer_failure(
                    f"rank {self._rank}: the agreement of load_state_dict (every rank loads its state at the same "
                    "time; nothing was loaded)", step=self._steps, rank=None, cause=exc, who=who,
                ) from exc
            same = agreed["highest"] == agreed["lowest"]
            if same:
                apply()
        if not same:
            raise EPLBError(
                "load_state_dict: the ranks loaded states with different placements or step counts "
                "(saved at different times?); nothing was loaded on any rank. Load the states every "
                "rank saved at the same step"
            )

    # ------------------------------------------------------------------ recording
    def start_recording(self, path: str | os.PathLike, *, chunk_steps: int = 256) -> None:
        """Record the load of every following step (summed over the EP group) into the trace
        file ``path`` (`eplb.traces.LoadRecorder`; every rank must call it, rank 0 writes).
        Steps with ``tracker.enabled = False`` are not recorded. The file is a load source for
        ``eplb plan`` / ``eplb simulate``. Raises `EPLBError` while a recording is running."""
        self._check_open()
        self._recorder.start(path, chunk_steps=chunk_steps)

    def stop_recording(self) -> Trace | None:
        """Stop the recording and write its file; returns the `eplb.traces.Trace` on rank 0
        (None on other ranks, or when no step was recorded).

        Idempotent: with no recording running (never started, already stopped, or ended by
        `close`) it does nothing and returns None, so a ``finally:`` block may call it
        unconditionally; `start_recording` while one runs raises `EPLBError` instead, since it
        would drop the running recording. A stop cut short (Ctrl-C while the file is written) has
        ended the recording; the next call writes the file."""
        return self._recorder.stop()

    @property
    def recording(self) -> bool:
        """True while a trace is being recorded."""
        return self._recorder.recording

    # ------------------------------------------------------------------ logical weights
    def load_logical_state_dict(
        self, source: dict | str | os.PathLike, strict: bool = True
    ) -> LoadReport:
        """Load the unwrapped model's weights: dense tensors are copied, each logical expert's rows
        go into every slot of this rank that holds it (see docs/guide/checkpoints.md).

        Args:
            source: a state dict with the unwrapped model's keys (``[E, ...]`` stacked expert
                tensors, or one key per expert for ``ModuleList`` experts), a ``.safetensors`` file,
                or a folder of them (``model.safetensors.index.json`` when present). Safetensors are
                read lazily: this rank reads the dense tensors and only the expert rows its slots hold.
            strict: require exactly the model's keys (tied tensors need one of their names);
                with False, missing and unexpected keys are ignored. Shapes and dtypes must match
                either way.

        Returns:
            A `eplb.checkpoint.LoadReport` (rows and bytes read, slots written, what happened to an
            in-flight async rebalance).

        Raises:
            EPLBError: a key, shape or dtype does not fit (all checked before anything is written:
                nothing changed), or the source cannot be read.

        Collective only while an async rebalance is in flight: it is driven to completion first
        (``synchronize``; the report says ``in_flight="waited"``), so every rank must then call it.
        Peak extra memory: one per-expert tensor's rows of one layer.
        """
        self._check_open()
        report = self._loader.load(
            source, strict=strict, layers=self._layers, rank=self._rank, before_write=self._settle_for_load
        )
        if self._unloaded_hook is not None and not self._loader.unloaded:
            self._unloaded_hook.remove()
            self._unloaded_hook = None
        return report

    def _install_loader(self, loader: LogicalLoader, device: torch.device, *, experts_on_meta: bool) -> None:
        self._loader = loader
        self._unloaded_hook = None
        # The meta tensors, if any (experts or not); a model built on meta moves to device whole.
        loader.materialize(self.module, device, move_real=experts_on_meta)
        if experts_on_meta:
            loader.track_experts_unloaded()
        if loader.unloaded:
            self._unloaded_hook = self.module.register_forward_pre_hook(self._refuse_unloaded)
        self._state_hook = self.module.register_load_state_dict_pre_hook(self._check_model_state_dict)

    def _refuse_unloaded(self, module, args) -> None:
        missing = self._loader.unloaded
        if missing:
            raise EPLBError(
                f"the model was wrapped on the meta device and {len(missing)} of its tensors hold no weights yet "
                f"(e.g. {missing[:3]}); call wrapper.load_logical_state_dict(checkpoint) before the first forward"
            )

    def _check_model_state_dict(self, module, state_dict, *args) -> None:
        self._loader.check_model_state_dict(state_dict, set(module.state_dict().keys()))

    def _settle_for_load(self) -> str:
        if not self.async_in_flight:
            return "none"
        if self._rank == 0:
            logger.info("load_logical_state_dict waits for the in-flight async rebalance to finish")
        self.synchronize()
        return "waited"

    # ------------------------------------------------------------------ rebalancing
    def rebalance(self) -> RebalanceReport | None:
        """Rebalance now from the current window (all-reduced over the EP group: every rank must
        call it).

        Returns:
            The `eplb.executor.RebalanceReport` once every layer is committed (sync mode), or None
            at once (async mode: the rebalance commits layer by layer at the next steps,
            `synchronize` waits for it and ``stats()`` reports it when done). An async rebalance
            already in flight is finished first. In both modes an empty window gives a skipped
            report at once.
        """
        self._check_open()
        with self._collective_sequence():
            if self.async_in_flight:
                self._synchronize()
            return self._start_rebalance()

    def synchronize(self) -> RebalanceReport | None:
        """Drive an in-flight async rebalance to completion, blocking (collective: every rank must
        call it). Returns its report, or None when nothing was in flight (always, in sync mode)."""
        self._check_open()
        with self._collective_sequence():
            return self._synchronize()

    def _synchronize(self) -> RebalanceReport | None:
        if not self.async_in_flight:
            return None
        try:
            self._executor.drain(self._apply)  # applied inside each commit's critical section
        except BaseException:
            # Layers committed by this call before the failure hold the new rows: record what is there.
            self._placement = self._committed_placement()
            raise
        return self._last_report

    @property
    def async_in_flight(self) -> bool:
        """True while an async rebalance is planned, moving or being committed."""
        return self._executor.in_flight

    def _apply(self, outcome: StepOutcome) -> None:
        """Take over what the executor committed, finished or aborted: the placement the layers
        hold (read back from them by the executor), the report, the decision and the counters.
        The executors call it (their ``settle``) inside the critical section of the agreement and
        commits that decided ``outcome``: every rank counts the same rebalances, whatever Ctrl-C
        interrupts. Assignments only: it cannot fail."""
        if outcome.placement is not None:
            self._placement = outcome.placement
        if outcome.decision is not None and outcome.decision.gain is not None:
            self._last_gain = outcome.decision.gain
        if outcome.report is not None:
            self._last_report = outcome.report
            if not outcome.report.skipped:
                self._count(outcome.report)

    def _plan(self, load_LE: torch.Tensor, old: Placement) -> Decision:
        """The planner's `Decision` for this model, topology and config (pure: runs on the async
        worker too, and returns everything it decided)."""
        options = PlanOptions(num_groups=self._num_groups, min_improvement=self.eplb_config.min_improvement,
                              policy_options=self.eplb_config.policy_options())
        return plan(load_LE, old, self.eplb_config.policy, self._topology, options)

    def _start_rebalance(self) -> RebalanceReport | None:
        load_LE = self._collective(
            "the load all-reduce of a rebalance", self.tracker.window_load, self._collective_group
        ).to("cpu", torch.float64)
        old = self._placement
        empty = skip_empty_window(load_LE)
        if empty is not None:
            return self._skip(empty.skip_reason)
        # Async: the planner runs on the worker thread; the main thread goes back to the forward passes.
        if self.eplb_config.use_async:
            self._executor.begin(self._layers, old, lambda: self._plan(load_LE, old))
        else:
            self._executor.begin(self._layers, old, lambda: self._decide_or_fail(load_LE, old))
        if self.eplb_config.use_async:
            if not self._executor.in_flight:  # every rank skipped it at once (a rank was busy)
                self._last_report = self._executor.last_report
            return None
        try:
            # Sync: begin + drain; the last commit and _apply share one critical section.
            outcome = self._executor.drain(self._apply)
        except BaseException as exc:
            # Committed layers hold the new rows, the others the old: record what is really there.
            self._placement = self._committed_placement()
            if isinstance(exc, CommunicationError) and self._health is not None:
                self._health.lost()  # the transfer group's connections are closed: rebuild before the next use
            raise
        return outcome.report

    def _count(self, report: RebalanceReport) -> None:
        self._num_rebalances += 1
        self._bytes_moved_total += report.bytes_moved

    def _decide_or_fail(self, load_LE: torch.Tensor, old: Placement) -> Decision:
        """Sync mode's decision. If the policy raises, ``async_on_error`` decides, as in async
        mode: ``"log"`` logs it and skips the rebalance (the placement stays and the step's output
        is returned as usual); ``"raise"`` raises `EPLBError` from it. Nothing moves either way."""
        try:
            return self._plan(load_LE, old)
        except Exception as exc:  # noqa: BLE001 - the policy is user code; async_on_error decides
            message = (
                f"policy {self.eplb_config.policy!r} failed at step {self._steps}: {type(exc).__name__}: "
                f"{exc}; the placement is unchanged"
            )
            if self.eplb_config.async_on_error == "raise":
                raise EPLBError(f"{message} (async_on_error='raise'; 'log' logs it and keeps serving)") from exc
            if self._rank == 0:
                logger.error("rebalance aborted: %s", message, exc_info=exc)
            return Decision(new=None, skip_reason=f"aborted: {message}")

    def _collective(self, operation: str, fn, *args):
        """``fn(*args)``, a collective; a backend failure becomes `eplb.errors.peer_failure`."""
        try:
            return fn(*args)
        except RuntimeError as exc:
            if self._num_ranks == 1:
                raise
            who = None
            if self._health is not None and self._collective_group is self._topology.control_group:
                who = self._health.describe(self._health.lost())
            raise peer_failure(f"rank {self._rank}: {operation}", step=self._steps, rank=None, cause=exc,
                               who=who) from exc

    def _committed_placement(self) -> Placement:
        """The placement the layers hold now, read back from the layers."""
        return placement_of(self._layers, self._placement)

    def _skip(self, reason: str) -> RebalanceReport:
        report = RebalanceReport.skip(reason)
        if self._rank == 0:
            logger.info("rebalance skipped: %s", reason)
        self._last_report = report
        return report

    def _steps_to_next_rebalance(self) -> int | None:
        interval = self.eplb_config.step_interval
        return None if interval is None else interval - self._steps % interval

    def step(self) -> None:
        """Count one step by hand: record-window bookkeeping, async commits, and the rebalance
        trigger. Forwards count themselves; call this after each replay of a CUDA graph that
        captured the model's forward (the capture itself counts no step).

        Commits (sync or async) copy weights and maps in place, so a graph captured once stays
        valid across every rebalance, with any dispatcher that does not sync (one rank, or
        ``dispatcher="fixed_capacity"``); see docs/guide/fast-forward.md for the recipe.
        """
        self._check_open()
        self._begin_collectives()
        self._on_step()

    def set_valid_tokens(self, num_valid_tokens: torch.Tensor | int | None) -> None:
        """Mark rows ``>= num_valid_tokens`` of every MoE layer's input as padding.

        Args:
            num_valid_tokens: None (every row is real; the default), an int ``>= 0``, or a 0-d
                integer tensor on the experts' device. A tensor is read on the device at every
                forward, so updating it in place (``n.fill_(k)``) between CUDA-graph replays
                changes the padding without re-capturing; an int is fixed into a capture.

        Padding rows are not recorded in the tracker, not dispatched, and their MoE output is
        zero (the rest of the model still runs on them); real rows give exactly what they give
        without padding. With transformers experts padding costs no expert GEMM.

        What is checked (`eplb.tracker.check_num_valid_tokens`), without ever syncing with the
        device: the type, shape, dtype and device here; the value of an int or of a CPU tensor
        here (``>= 0``) and at every forward (``<= T``, the rows of each MoE layer's input). A
        tensor on an accelerator is read only by the kernels: a negative value there marks every
        row as padding and one above ``T`` marks none.

        Raises:
            EPLBError: a bool, a float or any other type; a tensor that is not a one-element
                integer tensor on the experts' device; a count ``< 0`` (at this call) or ``> T``
                (at the forward).
        """
        self._check_open()
        n = num_valid_tokens
        if n is not None:
            n = check_num_valid_tokens(n, self.tracker.device, where="the experts")
        for layer in self._layers:
            layer.valid_tokens = n

    def _before_forward(self, module, args) -> None:
        self._begin_collectives()

    def _begin_collectives(self) -> None:
        """Start a sequence of eplb's collectives on this rank (a forward and its step, a
        rebalance, synchronize, unwrap): every rank issues the same collectives in the same order.

        A sequence that ended by an exception (a ``KeyboardInterrupt`` from Ctrl-C, an error of
        the model's own code, one rank's bad input) left this rank's collectives out of step with
        its peers': a peer may wait in a collective this rank will never issue, and this rank's
        next collective would meet a different one of the peer's (gloo then aborts the process on
        the size mismatch, or pairs the wrong data). So the groups are marked broken
        (`eplb.comm.recovery.GroupHealth.left`) and rebuilt, as after a lost peer; the peer's
        collective times out within ``async_timeout_s`` and it rebuilds too."""
        health = self._health
        if health is None:
            return
        if self._in_collectives:  # the last sequence did not end: it was cut
            health.left()
        self._recover_groups()
        self._in_collectives = True

    @contextlib.contextmanager
    def _collective_sequence(self):
        """A sequence of eplb's collectives (see `_begin_collectives`) that is one call: it ends
        cleanly only when its body returns; an exception leaves it open, so the next one rebuilds."""
        self._begin_collectives()
        yield
        self._in_collectives = False

    def _recover_groups(self) -> None:
        """After a peer stopped answering (a failed collective marked the groups broken): once
        every rank is back, agree on what each holds and rebuild eplb's gloo groups.

        Collective: every rank calls it at its next forward (or rebalance, synchronize, unwrap),
        and waits at most ``async_timeout_s`` for the others (`EPLBError` naming the ranks that
        did not come; the next call tries again). Then, on every rank alike:

        1. the in-flight rebalance is forgotten (layers committed keep their rows);
        2. the placement is the one the slots really hold: rank ``g``'s slots carry rank ``g``'s
           rows (the ranks may have committed different layers if one saw the last agreement
           and the other did not); only maps change, no weight moves. If that placement lacks a
           logical expert, no rank has its weights: `EPLBError` (restart from a checkpoint);
        3. the step count is the largest of the ranks' (rebalances trigger at the same step);
        4. new control and transfer groups replace the broken ones (`eplb.runtime.rebuild_groups`).
        """
        health = self._health
        if health is None or not health.broken:
            return
        self._executor.abandon()
        self._placement = self._committed_placement()
        payload = {"steps": self._steps, "phy2log": self._placement.phy2log.tolist()}
        where = f"rank {self._rank}: rebuilding eplb's process groups after a lost peer"
        try:
            payloads, prefix = health.meet(payload)
        except NotEveryRank as exc:
            raise missing_ranks_error(where, exc, health.timeout_s) from exc.store_error
        # Step 2: the placement every rank's slots hold, from what each rank says it holds.
        slots = self._num_physical // self._num_ranks
        rows = [torch.tensor(p["phy2log"], dtype=torch.int64) for p in payloads]
        holding = torch.cat([rows[g][:, g * slots:(g + 1) * slots] for g in range(self._num_ranks)], dim=1)
        try:
            placement = Placement.from_phy2log(holding, self._num_logical).validate(self._num_ranks)
        except EPLBError as exc:
            raise EPLBError(
                f"{where}: the ranks committed different layers and no rank holds the weights of some logical "
                f"experts now ({exc}); restart every rank from a checkpoint"
            ) from None
        commits = [
            (layer, layer.prepare_commit(placement.phy2log[layer.layer_index]))
            for layer in self._layers
            if not torch.equal(placement.phy2log[layer.layer_index], self._placement.phy2log[layer.layer_index])
        ]
        # Step 4: new groups (bounded by async_timeout_s; a rank that does not come makes it fail).
        # Ctrl-C is held from here to the end: a rank interrupted after its new groups exist but
        # before it recorded them would stay a generation behind the others, and the ranks would
        # never meet again. The hold lasts at most the groups' creation (async_timeout_s each).
        with critical_section():
            try:
                runtime = rebuild_groups(self._runtime, health, prefix)
            except Exception as exc:
                health.give_up(prefix)
                raise EPLBError(f"{where}: creating the new groups failed ({type(exc).__name__}: {exc}); "
                                "the next forward tries again") from exc
            for layer, prepared in commits:
                layer.apply_commit(prepared, None)
            self._placement = placement
            self._steps = max(p["steps"] for p in payloads)
            self._runtime = runtime
            self._topology = runtime.topology
            self._collective_group = runtime.collective_group
            self._recorder.group = runtime.collective_group
            health.rebuilt()
        if self._rank == 0:
            logger.warning("eplb's process groups were rebuilt after a lost peer (generation %d); %d layers "
                           "took the placement their slots hold", health.generation, len(commits))

    def _forward_hook(self, module, args, output) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._in_collectives = False
            return  # a capture is not a step; replays are counted by step()
        self._on_step()

    def _on_step(self) -> None:
        with critical_section():
            self.tracker.step()
            self._steps += 1
        if self._recorder.wants(self.tracker):
            # Every rank joins the all-reduce; rank 0 writes.
            self._recorder.append(self._collective(
                "the trace's load all-reduce", self.tracker.last_step_load, self._collective_group
            ))
        if self._balancedness_logger is not None:
            self._balancedness_logger(
                self._steps, self.tracker, self._placement, self._collective_group, self._steps_to_next_rebalance()
            )
        if self.async_in_flight:
            try:
                self._executor.on_step(self._apply)  # applied inside the agreement's critical section
            except BaseException:
                # An interrupt between a commit and _apply must not leave a stale placement here.
                self._placement = self._committed_placement()
                raise
        interval = self.eplb_config.step_interval
        if interval is not None and self._steps % interval == 0:  # None: a static placement
            if self.async_in_flight:
                if self._rank == 0:
                    logger.warning(
                        "step %d: the previous async rebalance is still in flight; this one is skipped "
                        "(raise step_interval or async_layers_per_step)", self._steps,
                    )
            else:
                self._start_rebalance()
        self._in_collectives = False  # the step's collectives are done: the sequence ended cleanly

    # ------------------------------------------------------------------ ending
    def close(self) -> None:
        """Stop counting steps and finish the trace; the model keeps running with its current
        placement. Idempotent; also called by ``with EPLBWrapper(...) as w:``. A close cut short
        (Ctrl-C while the trace file is written) is finished by the next call.

        Raises:
            EPLBError: a step of the trace being recorded held a negative or NaN count (that
                chunk is dropped, the rest written); the wrapper is closed anyway.
        """
        if self._closed and not self._recorder.unfinished:
            return
        self._closed = True
        self._hook.remove()
        self._pre_hook.remove()
        self._executor.close()
        self._recorder.stop()

    def unwrap(self) -> nn.Module:
        """Put the original experts modules back, holding the primary copy of every expert, and
        return the model (for saving it in its own format). With several ranks this all-gathers
        the slots over the EP group (every rank must call it). The wrapper is closed afterwards."""
        if self._unwrapped:
            raise EPLBError(
                "this EPLBWrapper was already unwrapped; the model is wrapper.module, holding every logical expert"
            )
        if self._gathered is None:
            with self._collective_sequence():
                if not self._closed:
                    self._synchronize()
                # The gathers and their record form one critical section: once the last gather has
                # returned, the peers may have finished their unwrap, so this rank must never gather
                # again (alone, it would time out for ever); a call again after an interrupt from
                # here on takes the record. On eplb's timeout-bounded group where there is one (gloo);
                # a failure names the operation (and delivers a held Ctrl-C).
                with critical_section():
                    self._gathered = [
                        self._collective("the all-gather of unwrap()", layer.logical_module, self._collective_group)
                        for layer in self._layers
                    ]
        restored = self._gathered
        self.close()
        modules = [
            module.to_module_list() if spec.block_forward is not None else module
            for spec, module in zip(self._specs, restored)
        ]
        with critical_section():  # every layer put back, or none
            self._state_hook.remove()
            if self._unloaded_hook is not None:
                self._unloaded_hook.remove()
            for spec, module in zip(self._specs, modules):
                if spec.block_forward is not None:
                    del spec.parent.forward  # the instance attribute set at install; the class method is back
                setattr(spec.parent, spec.attr, module)
            self._unwrapped = True
            self._gathered = None
        return self.module

    def _check_open(self) -> None:
        if self._closed:
            raise EPLBError(
                "this EPLBWrapper is closed (close() or unwrap() was called); wrap the model again"
            )


# ---------------------------------------------------------------------------------------- helpers
def _resolve_num_groups(model: nn.Module, num_groups: int | None) -> int:
    config = getattr(model, "config", None)
    from_model = None
    for attr in _GROUP_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            from_model = (attr, value)
            break
    if num_groups is None:
        return from_model[1] if from_model else 1
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise EPLBError(f"num_groups ({num_groups!r}) must be an int >= 1, or None to take it from the model")
    if from_model and from_model[1] != num_groups:
        raise EPLBError(
            f"num_groups ({num_groups}) differs from the model config's {from_model[0]} ({from_model[1]}); "
            f"pass num_groups={from_model[1]} or None"
        )
    return num_groups


def _preview_ranks(num_ranks, num_physical: int, num_logical: int) -> int:
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise EPLBError(f"stats(num_ranks={num_ranks!r}): num_ranks must be an int >= 1")
    if num_physical % num_ranks:
        fixes = _redundant_fixes(num_logical, num_physical - num_logical, num_ranks)
        raise EPLBError(
            f"stats(num_ranks={num_ranks}): the {num_physical} physical slots per layer cannot be split over "
            f"{num_ranks} ranks; preview a divisor of {num_physical}, or wrap with num_redundant_experts "
            f"{' or '.join(map(str, fixes))}"
        )
    return num_ranks


def _check_sizes(num_layers, num_logical, num_physical, num_groups, num_nodes, num_ranks) -> None:

    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise EPLBError(f"num_nodes ({num_nodes!r}) must be an int >= 1")
    check_policy_inputs(
        torch.zeros(num_layers, num_logical),
        num_physical=num_physical,
        num_groups=num_groups,
        num_nodes=num_nodes,
        num_ranks=num_ranks,
    )


def _state_digest(placement: Placement, steps: int) -> int:
    """A 56-bit digest of a loaded state's placement and step count (equal on every rank that
    loads states saved at the same step); fits the agreement's int64 all-reduce."""
    data = placement.phy2log.to(torch.int64).contiguous().numpy().tobytes() + int(steps).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _check_placement_shape(
    placement: Placement, num_layers: int, num_logical: int, num_physical: int
) -> None:
    got = (placement.num_layers, placement.num_logical, placement.num_physical)
    want = (num_layers, num_logical, num_physical)
    if got != want:
        raise EPLBError(
            f"placement has (num_layers, num_logical, num_physical) = {got} but the model and config "
            f"give {want}"
        )


def _initial_placement(initial, num_layers, num_logical, num_physical, num_ranks) -> Placement:
    if initial is None:
        return Placement.initial(num_layers, num_logical, num_physical, num_ranks)
    if isinstance(initial, (str, os.PathLike)):
        initial = Placement.load(initial)
    if not isinstance(initial, Placement):
        raise EPLBError(
            "initial_placement must be a Placement, a path to a saved placement, or None; "
            f"got {type(initial).__name__}"
        )
    _check_placement_shape(initial, num_layers, num_logical, num_physical)
    return initial.validate(num_ranks).clone()  # the caller keeps its object; the wrapper owns this one


def _expert_device(specs) -> torch.device:

    devices = set()
    for spec in specs:
        owned = direct_tensors(spec.experts)
        devices.update(owned[n].device for n in spec.expert_tensors)
    if len(devices) != 1:
        raise EPLBError(
            f"expert weights are on several devices ({sorted(map(str, devices))}); put every MoE layer's "
            "experts on this rank's device before wrapping"
        )
    return devices.pop()


_COLLECTING_AT_EXIT = False


def _collect_at_exit() -> None:
    """Register, once, an ``atexit`` hook that runs the garbage collector.

    A wrapper and its model form a reference cycle (the model's forward hook is the wrapper's
    method), so a wrapper left behind at the end of a script is freed only by the collection the
    interpreter runs while it tears itself down. The process groups and communicators it holds
    are then destroyed among half-finalised modules and threads, where gloo aborts the process
    ("terminate called without an active exception"; seen on 4 CPU ranks in about 1 exit of 4).
    Collecting in an ``atexit`` hook frees them while the interpreter is still whole.
    """
    global _COLLECTING_AT_EXIT
    if not _COLLECTING_AT_EXIT:
        atexit.register(gc.collect)
        _COLLECTING_AT_EXIT = True


_WRAPS: dict[tuple[int, ...], int] = {}  # wraps over each EP group's ranks so far, in this process


def _check_ranks_agree(
    error, summary, group, num_ranks: int, rank: int, timeout_s: float, store: BoundedStore
) -> str:
    """Compare every rank's wrap-time error and summary through the job's store (``store``),
    waiting at most ``timeout_s`` (``async_timeout_s``) for the others, the store's own answers
    included; raise `EPLBError` on any error or difference, naming the rank, or the store that
    did not answer (its `eplb.comm.recovery.StoreSilent` chained). Returns a store key prefix the
    ranks of this wrapper share."""
    ranks = tuple(dist.get_process_group_ranks(group))
    count = _WRAPS.get(ranks, 0)
    _WRAPS[ranks] = count + 1
    key = f"eplb/wrap/{'-'.join(map(str, ranks))}/{count}"
    try:
        gathered = rendezvous(store, f"{key}/agree", rank, num_ranks, [error, summary], timeout_s,
                              what="the wrap-time agreement")
    except NotEveryRank as exc:
        raise missing_ranks_error(f"rank {rank}: the ranks' wrap-time agreement", exc, timeout_s) from exc.store_error
    errors = [(r, e) for r, (e, _) in enumerate(gathered) if e]
    if errors:
        own = error or f"rank {errors[0][0]} failed: {errors[0][1]}"
        raise EPLBError(own)
    reference = gathered[0][1]
    for r, (_, other) in enumerate(gathered):
        differ = [k for k in reference if reference[k] != other[k]]
        if differ:
            shown = {k: (reference[k], other[k]) for k in differ if k != "placement"}
            raise EPLBError(
                f"ranks disagree at wrap time: rank 0 and rank {r} differ in {', '.join(differ)} "
                f"(rank 0 vs rank {r}: {shown}); every rank must wrap the same model with the same config, "
                "num_groups, num_nodes and initial placement"
            )
    return key


def _error_text(error: Exception | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, EPLBError) else f"{type(error).__name__}: {error}"


def _check_saved_slots(layer, saved) -> None:
    """Raise `EPLBError` unless ``saved`` holds exactly ``layer``'s slot tensors, same shapes and dtypes."""
    current = layer.slot_tensors()
    where = f"EPLBWrapper state, layer {layer.layer_index}"
    if not isinstance(saved, dict) or set(saved) != set(current):
        names = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise EPLBError(f"{where}: saved slot tensors {names} do not match this model's {sorted(current)}")
    for name, dst in current.items():
        src = saved[name]
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, torch.Tensor) else type(src).__name__
            raise EPLBError(
                f"{where}: slot tensor {name!r} is {got}; this model's is {tuple(dst.shape)} {dst.dtype} "
                "(states load without casts: save and load with the same model and dtype)"
            )




def _balancedness_logger(config: EPLBConfig, num_ranks: int, rank: int):
    if not config.log_balancedness:
        return None

    return BalancednessLogger(config.log_balancedness_interval, num_ranks, rank)
