"""The ``eplb`` command: ``simulate``, ``plan``, ``show`` and ``demo``.

TRACE arguments are read by `eplb.traces.load_trace`: a trace file, ``example`` (the trace
bundled with eplb) or a synthetic spec such as ``synthetic:lognormal?steps=2000&sigma=1``.
Every error is one line on stderr, ``eplb: error: ...``, naming the flag to change, with exit
status 2 for a bad command line and 1 for anything else (bad files, bad specs, sizes that do not
fit). Output paths (``--plot``, ``--json``, ``-o``) and the packages they need are checked before
any work starts. ``--import MODULE`` (repeatable) imports a module (or a ``.py`` file) first, so
the policies it registers with ``@eplb.register_policy`` can be named by ``--policy``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_EXIT_ERROR = 1
_EXIT_USAGE = 2


class _UsageError(Exception):
    """A bad command line; argparse's own errors are turned into this (one line, no usage dump)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eplb`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            # The demo parses its own options; hand them over untouched.
            return _run_demo(argv[1:])
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if getattr(args, "func", None) is None:
            raise _UsageError("choose a command: simulate, plan, show or demo (see 'eplb --help')")
        return int(args.func(args) or 0)
    except _UsageError as exc:
        return _fail(str(exc), _EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (e.g. `eplb show p.json | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        return _fail(_one_line(exc), _EXIT_ERROR)


def _fail(message: str, status: int) -> int:
    print(f"eplb: error: {message}", file=sys.stderr)
    return status


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``exc`` when it lies outside eplb, the standard library
    and installed packages (the user's own module, e.g. one given to --import), else None."""
    import sysconfig
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    path = os.path.abspath(frames[-1].filename)
    eplb_dir = os.path.dirname(os.path.abspath(__file__))
    library_dirs = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if path.startswith(eplb_dir + os.sep) or any(path.startswith(d + os.sep) for d in library_dirs):
        return None
    return f"{frames[-1].filename}:{frames[-1].lineno}"


def _one_line(exc: Exception) -> str:
    from pydantic import ValidationError

    from eplb.errors import EPLBError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(_FLAGS.get(str(p), str(p)) for p in err.get("loc", ()))
        text = f"{where}: {err['msg']}" if where else err["msg"]
    elif isinstance(exc, EPLBError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif (origin := _user_frame(exc)) is not None:
        # Raised by the user's own code (a policy brought in with --import): say where, not "a bug in eplb".
        text = f"{type(exc).__name__}: {exc} (raised in your code at {origin})"
    else:
        # Not a user error: still one line, but say what it was so it can be reported.
        text = f"{type(exc).__name__}: {exc} (this looks like a bug in eplb; please report it)"
    return " ".join(text.split())


_FLAGS = {"policy": "--policy", "window_size": "--window", "step_interval": "--interval",
          "num_redundant_experts": "--redundant", "num_ranks": "--ranks", "num_nodes": "--nodes",
          "num_groups": "--groups", "min_improvement": "--min-improvement", "bytes_per_expert": "--bytes-per-expert",
          "initial_placement": "--initial", "migration_budget": "--migration-budget", "refine": "--refine"}
"""SimConfig fields and the simulate flags that set them (errors name the flag)."""


# ---------------------------------------------------------------------------------------- parser
def _build_parser() -> argparse.ArgumentParser:
    from eplb import __version__

    parser = _Parser(
        prog="eplb",
        description="Expert-parallel load balancing for MoE models: simulate policies on traces, plan and "
        "inspect static placements, run the demo.",
        epilog="TRACE is a trace file (.npz), 'example' (the trace bundled with eplb) or a synthetic spec "
        "such as 'synthetic:lognormal?steps=2000&layers=4&experts=64&sigma=1&seed=0'.",
    )
    parser.add_argument("--version", action="version", version=f"eplb {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "simulate", help="replay a trace through one or more configs and compare them",
        description="Replay TRACE through every combination of the given options (each option may be "
        "repeated: --policy default --policy topk --interval 100 --interval 1000 gives four configs) and "
        "print one row per config.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file, 'example', or a synthetic:... spec")
    p.add_argument("--policy", action="append", metavar="NAME", help="registered policy (default: default)")
    p.add_argument("--window", action="append", type=_positive_int, metavar="STEPS",
                   help="steps of load the policy plans from (default 1000)")
    p.add_argument("--interval", action="append", type=_positive_int, metavar="STEPS",
                   help="steps between rebalances (default 3000; >= the trace length = never rebalance)")
    _add_sizes(p, repeatable=True)
    p.add_argument("--min-improvement", action="append", type=_fraction, metavar="X",
                   help="skip a rebalance whose predicted balancedness gain is below X (default 0)")
    p.add_argument("--migration-budget", action="append", type=_budget, metavar="X",
                   help="policy option: at most this fraction (0, 1] of each layer's slots receive a new "
                        "expert per rebalance, at least 1/P (repeat to compare); applies to the --policy "
                        "values that accept it (default does, topk does not)")
    p.add_argument("--refine", action="store_true",
                   help="policy option: swap search after packing, in every config whose --policy accepts "
                        "it (default does, topk does not)")
    p.add_argument("--bytes-per-expert", type=_byte_size, default=0, metavar="BYTES",
                   help="bytes of one expert's weights, e.g. 44M, to report bytes moved (default 0)")
    p.add_argument("--initial", metavar="PLACEMENT.json",
                   help="placement in force at step 0 (from 'eplb plan'); default: the wrapper's initial one")
    p.add_argument("--plot", metavar="OUT.png", help="write balancedness over time and rank-load heatmaps")
    p.add_argument("--json", metavar="OUT.json", help="write every per-step series and rebalance as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (else shown on a terminal)")
    _add_import(p)
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "plan", help="plan a static placement from a trace's total load",
        description="Run a policy once on the load of TRACE summed over all its steps and save the placement "
        "(load it with Placement.load or EPLBWrapper(..., initial_placement=...)).",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file, 'example', or a synthetic:... spec")
    p.add_argument("--policy", default="default", metavar="NAME", help="registered policy (default: default)")
    _add_sizes(p, repeatable=False)
    p.add_argument("-o", "--output", metavar="PLACEMENT.json", help="where to save the placement")
    _add_import(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "show", help="summarise a saved placement",
        description="Print replica counts and the experts of each rank of PLACEMENT.json, and with --trace "
        "its predicted balancedness on that trace's total load.",
    )
    p.add_argument("placement", metavar="PLACEMENT.json")
    p.add_argument("--trace", metavar="TRACE", help="trace to predict balancedness on")
    p.add_argument("--ranks", type=_positive_int, metavar="G",
                   help="number of ranks (default: the one 'eplb plan' stored in the file)")
    p.add_argument("--layer", type=int, action="append", metavar="I",
                   help="layer to list per-rank experts for (repeatable; default: all if L <= 4, else 0)")
    p.add_argument("--all-layers", action="store_true", help="list per-rank experts of every layer")
    p.set_defaults(func=_cmd_show)

    sub.add_parser(
        "demo", help="the README demo: a small MoE on 4 CPU ranks, balanced by EPLB (see 'eplb demo --help')",
        add_help=False,
    )
    return parser


def _add_sizes(p: argparse.ArgumentParser, *, repeatable: bool) -> None:
    # simulate takes several values per option (their product is compared); plan takes one.
    def kw(default):
        return {"action": "append"} if repeatable else {"default": default}

    p.add_argument("--redundant", type=_non_negative_int, metavar="N", **kw(0),
                   help="redundant slots per layer; P = E + N (default 0)")
    p.add_argument("--ranks", type=_positive_int, metavar="G", **kw(8),
                   help="expert-parallel ranks (default 8)")
    p.add_argument("--nodes", type=_positive_int, metavar="N", **kw(1), help="nodes (default 1)")
    p.add_argument("--groups", type=_positive_int, metavar="N", **kw(1),
                   help="expert groups per layer, for group-limited routing (default 1)")


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE (a module name, or a path to a .py file) first, so the policies it "
                   "registers with @eplb.register_policy can be named by --policy (repeatable)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1) (a balancedness gain)")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
          "ti": 2**40}


def _byte_size(text: str) -> int:
    """``4096``, ``44M``, ``1.5GB``, ``64MiB`` -> bytes (k/M/G/T decimal, Ki/Mi/Gi/Ti binary)."""
    raw = text.strip().lower().removesuffix("b")
    number = raw.rstrip("kmgti")
    unit = raw[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte size (e.g. 4096, 44M, 1.5G, 64MiB)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return int(value)


# ---------------------------------------------------------------------------------------- checks
def _import_modules(names: list[str]) -> None:
    """``--import``: import each module (or ``.py`` file) so that its policies are registered."""
    import importlib
    import importlib.util

    from eplb.errors import EPLBError

    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the `eplb` script's sys.path[0] is its bin folder
    for name in names:
        try:
            if name.endswith(".py"):
                if not Path(name).is_file():
                    raise EPLBError(f"--import {name}: the file does not exist")
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except EPLBError:
            raise
        except Exception as exc:
            raise EPLBError(f"--import {name}: {type(exc).__name__}: {exc}") from None


def _check_policy(name: str) -> None:
    from eplb.errors import EPLBError
    from eplb.policies import available_policies

    names = available_policies()
    if name not in names:
        raise EPLBError(
            f"--policy {name}: no such policy (registered: {', '.join(names)}); for a policy of your own, "
            "pass --import MODULE, a module that registers it with @eplb.register_policy"
        )


def _check_sizes(num_logical: int, redundant: int, ranks: int, nodes: int, groups: int) -> None:
    """The size rules of `eplb.policies.check_policy_inputs`, with the flags to change."""
    from eplb.errors import EPLBError
    from eplb.placement import _redundant_fixes

    num_physical = num_logical + redundant
    if num_physical % ranks:
        fixes = _redundant_fixes(num_logical, redundant, ranks)
        raise EPLBError(
            f"--ranks {ranks} does not divide the {num_physical} slots per layer ({num_logical} experts + "
            f"--redundant {redundant}); pass --redundant {' or '.join(map(str, fixes))}, or --ranks that divides "
            f"{num_physical}"
        )
    if num_logical % groups:
        raise EPLBError(
            f"--groups {groups} does not divide the trace's {num_logical} experts; pass --groups "
            f"{_divisors_text(num_logical)}"
        )
    if ranks % nodes:
        raise EPLBError(
            f"--nodes {nodes} does not divide --ranks {ranks} (every node holds as many ranks); pass --nodes "
            f"{_divisors_text(ranks)}"
        )


def _check_initial(path: str, trace, redundant_values: list[int], ranks_values: list[int]) -> None:
    """``--initial``: a placement for the trace's model, with as many slots as ``--redundant`` gives,
    planned for every ``--ranks`` value (when the file records its ranks, as ``eplb plan -o`` does)."""
    from eplb.errors import EPLBError
    from eplb.placement import Placement

    initial = Placement.load(path)
    if (initial.num_layers, initial.num_logical) != (trace.num_layers, trace.num_logical):
        raise EPLBError(
            f"--initial {path} is for {initial.num_layers} layers of {initial.num_logical} experts but the trace "
            f"has {trace.num_layers} of {trace.num_logical}; plan one from this trace with 'eplb plan'"
        )
    fits = initial.num_physical - initial.num_logical
    bad = [r for r in redundant_values if r != fits]
    if bad:
        raise EPLBError(
            f"--initial {path} has {initial.num_physical} slots per layer ({fits} redundant) but --redundant is "
            f"{bad[0]}; pass --redundant {fits}"
        )
    for ranks in ranks_values:
        Placement.load(path, num_ranks=ranks)


def _divisors_text(n: int, limit: int = 8) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    shown = ", ".join(map(str, divisors[:limit])) + (", ..." if len(divisors) > limit else "")
    return f"one of {shown}"


def _check_output(flag: str, path: str | None, *, plot: bool = False) -> None:
    """Raise `EPLBError` unless an output path is writable (its folder exists, it is not a folder) and, for a plot, its
    format is one matplotlib writes and matplotlib is installed: checked before any work."""
    from eplb.errors import EPLBError

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise EPLBError(f"{flag} {path}: is a folder; pass a file name")
    folder = target.resolve().parent
    if not folder.is_dir():
        raise EPLBError(f"{flag} {path}: the folder {folder} does not exist; create it or pass another path")
    if not os.access(folder, os.W_OK):
        raise EPLBError(f"{flag} {path}: the folder {folder} is not writable")
    if plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise EPLBError(f"{flag} needs matplotlib; install it with pip install 'eplb[plot]'") from None
        formats = Figure().canvas.get_supported_filetypes()
        suffix = target.suffix.lstrip(".").lower()
        if suffix not in formats:
            raise EPLBError(
                f"{flag} {path}: cannot write a {'.' + suffix if suffix else 'file without an extension'}; "
                f"use one of {', '.join('.' + f for f in sorted(formats))}"
            )


def _no_repeats(flag: str, values: list) -> list:
    from eplb.errors import EPLBError

    seen = set()
    for value in values:
        if value in seen:
            raise EPLBError(f"{flag} {value} is given twice; give each value once")
        seen.add(value)
    return values


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a fraction in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]: the fraction of slots that may move")
    return value


# ---------------------------------------------------------------------------------------- commands
def _cmd_simulate(args: argparse.Namespace) -> int:
    from eplb.simulate import SimConfig, simulate
    from eplb.traces import load_trace

    _import_modules(args.imports)
    _check_output("--plot", args.plot, plot=True)
    _check_output("--json", args.json)
    axes = {
        "policy": args.policy or ["default"],
        "window_size": args.window or [SimConfig.model_fields["window_size"].default],
        "step_interval": args.interval or [SimConfig.model_fields["step_interval"].default],
        "num_redundant_experts": args.redundant or [0],
        "num_ranks": args.ranks or [8],
        "num_nodes": args.nodes or [1],
        "num_groups": args.groups or [1],
        "min_improvement": args.min_improvement or [0.0],
        "migration_budget": args.migration_budget or [None],
        "refine": [args.refine],
    }
    for key, values in axes.items():
        _no_repeats(_FLAGS[key], values)
    for name in axes["policy"]:
        _check_policy(name)
    _check_option_flags(axes)
    trace = load_trace(args.trace)
    for redundant, ranks, nodes, groups in itertools.product(
        axes["num_redundant_experts"], axes["num_ranks"], axes["num_nodes"], axes["num_groups"]
    ):
        _check_sizes(trace.num_logical, redundant, ranks, nodes, groups)
    if args.initial:
        _check_initial(args.initial, trace, axes["num_redundant_experts"], axes["num_ranks"])
    for budget in args.migration_budget or []:
        _check_budget_flag(budget, trace.num_logical, axes["num_redundant_experts"])
    configs = [
        SimConfig(**fields, bytes_per_expert=args.bytes_per_expert, initial_placement=args.initial)
        for fields in _option_combinations(axes)
    ]
    # A bar only on a terminal: in a log file it is a line of carriage returns.
    result = simulate(trace, configs, progress=not args.no_progress and sys.stderr.isatty())
    print(f"trace: {_describe(args.trace, trace)}")
    if all(c.step_interval >= trace.steps for c in configs):
        print(f"note: the interval ({min(c.step_interval for c in configs)}) is not shorter than the trace "
              f"({trace.steps} steps), so no config rebalances; pass --interval")
    print(result.table())
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


_OPTION_DEFAULTS = {"migration_budget": None, "refine": False}
"""Policy options (`eplb.policies.POLICY_OPTIONS`) set by simulate flags, and their unset values."""


def _check_option_flags(axes: dict[str, list]) -> None:
    """``--migration-budget`` / ``--refine`` apply to the ``--policy`` values that accept them; at
    least one must, else the flag would be silently ignored."""
    from eplb.errors import EPLBError
    from eplb.policies import available_policies, policy_options

    for option, default in _OPTION_DEFAULTS.items():
        values = [v for v in axes[option] if v != default]
        if values and not any(option in policy_options(name) for name in axes["policy"]):
            flag = _FLAGS[option]
            takers = [name for name in available_policies() if option in policy_options(name)]
            given = ", ".join(f"'{name}'" for name in axes["policy"])
            raise EPLBError(
                f"{flag}: no --policy given accepts it: policy {given} does not accept the option "
                f"{option}={values[0]!r}; add --policy {' or --policy '.join(takers)}, or drop {flag}"
            )


def _check_budget_flag(budget: float, num_logical: int, redundant_values: list[int]) -> None:
    """``--migration-budget X`` must let at least one slot of a layer move (``X >= 1 / P``)."""
    from eplb.errors import EPLBError
    from eplb.policies import budget_slots, smallest_budget

    for redundant in redundant_values:
        num_physical = num_logical + redundant
        if budget_slots(budget, num_physical) < 1:
            raise EPLBError(
                f"--migration-budget {budget:g} lets no slot of a layer move: the trace's {num_logical} experts + "
                f"--redundant {redundant} make {num_physical} slots, and floor({budget:g} * {num_physical}) = 0; "
                f"pass --migration-budget {smallest_budget(num_physical):.6g} (1/{num_physical}) or more"
            )


def _option_combinations(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes, as `SimConfig` fields; the policy options only for the
    policies that accept them (for the others they stay unset, and the combinations they would
    have multiplied collapse into one)."""
    from eplb.policies import policy_options

    combos: list[dict] = []
    for values in itertools.product(*axes.values()):
        fields = dict(zip(axes, values))
        accepted = policy_options(fields["policy"])
        for option, default in _OPTION_DEFAULTS.items():
            if option not in accepted:
                fields[option] = default
        if fields not in combos:
            combos.append(fields)
    return combos


def _cmd_plan(args: argparse.Namespace) -> int:
    import time

    from eplb.metrics import balancedness
    from eplb.placement import Placement
    from eplb.policies import check_policy_inputs, get_policy
    from eplb.traces import load_trace

    _import_modules(args.imports)
    _check_policy(args.policy)
    _check_output("-o", args.output)
    trace = load_trace(args.trace)
    _check_sizes(trace.num_logical, args.redundant, args.ranks, args.nodes, args.groups)
    load_LE = trace.total()
    num_physical = trace.num_logical + args.redundant
    policy = get_policy(args.policy)
    check_policy_inputs(load_LE, num_physical=num_physical, num_groups=args.groups, num_nodes=args.nodes,
                        num_ranks=args.ranks)
    initial = Placement.initial(trace.num_layers, trace.num_logical, num_physical, args.ranks)
    t0 = time.perf_counter()
    placement = policy(load_LE, num_physical=num_physical, num_groups=args.groups, num_nodes=args.nodes,
                       num_ranks=args.ranks, old=initial)
    seconds = time.perf_counter() - t0
    before = balancedness(load_LE, initial, args.ranks)
    after = balancedness(load_LE, placement, args.ranks)
    print(f"trace: {_describe(args.trace, trace)}")
    print(f"policy {args.policy!r}: {args.ranks} ranks, {args.nodes} node(s), {args.groups} group(s), "
          f"{num_physical} slots per layer ({args.redundant} redundant); planned in {seconds:.2f} s")
    print(f"balancedness on the trace's total load: initial placement {before.aggregate:.4f} -> "
          f"planned {after.aggregate:.4f}")
    print(f"  per layer: {_floats(after.per_layer)}")
    if args.output:
        plan = {"policy": args.policy, "num_ranks": args.ranks, "num_nodes": args.nodes,
                "num_groups": args.groups, "trace": _describe(args.trace, trace),
                "balancedness": after.aggregate}
        # Placement.load reads only its own keys, so the extra "plan" record rides along for `eplb show`.
        with open(args.output, "w") as f:
            json.dump({**placement.to_dict(), "plan": plan}, f)
        print(f"wrote {args.output}")
    else:
        print("(not saved; pass -o PLACEMENT.json)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import torch

    from eplb.errors import EPLBError
    from eplb.metrics import balancedness
    from eplb.placement import Placement

    placement = Placement.load(args.placement)
    with open(args.placement) as f:
        plan = json.load(f).get("plan") or {}
    L, E, P = placement.num_layers, placement.num_logical, placement.num_physical
    ranks = args.ranks or plan.get("num_ranks")
    layers = _layers_to_list(args, L)
    if ranks is not None and P % ranks:
        raise EPLBError(
            f"--ranks {ranks} does not divide the placement's {P} slots per layer; pass --ranks "
            f"{_divisors_text(P)}"
        )
    if ranks is not None:
        placement.validate(ranks)
    trace = None
    if args.trace:
        if ranks is None:
            raise EPLBError("--trace needs the number of ranks: pass --ranks G")
        from eplb.traces import load_trace

        trace = load_trace(args.trace)
        if (trace.num_layers, trace.num_logical) != (L, E):
            raise EPLBError(
                f"the trace has L={trace.num_layers}, E={trace.num_logical} but the placement has "
                f"L={L}, E={E}; show a placement with a trace of the same model"
            )

    print(f"{args.placement}: {L} layers, {E} logical experts, {P} slots per layer ({P - E} redundant)")
    if plan:
        print(f"planned by policy {plan.get('policy')!r} on {plan.get('num_ranks')} ranks "
              f"from {plan.get('trace')}")
    values, counts = torch.unique(placement.logcnt, return_counts=True)
    histogram = ", ".join(f"{c} with {v}" for v, c in zip(values.tolist(), counts.tolist()))
    print(f"experts by replica count, over all layers: {histogram}")

    for layer in layers:
        replicated = [(e, c) for e, c in enumerate(placement.logcnt[layer].tolist()) if c > 1]
        shown = ", ".join(f"{e}x{c}" for e, c in replicated) or "none"
        print(f"layer {layer}: replicated experts (expert x replicas): {shown}")
        if ranks is not None:
            width = len(str(ranks - 1))
            for g in range(ranks):
                experts = " ".join(str(e) for e in placement.experts_of_rank(layer, g, ranks))
                print(f"  rank {g:>{width}}: {experts}")
    if len(layers) < L:
        print(f"(per-layer details for {len(layers)} of {L} layers; pass --layer I or --all-layers)")
    if ranks is None:
        print("(pass --ranks G for the experts of each rank and balancedness)")

    if trace is not None:
        load_LE = trace.total()
        b = balancedness(load_LE, placement, ranks)
        base = balancedness(load_LE, Placement.initial(L, E, P, ranks), ranks)
        print(f"on {_describe(args.trace, trace)}, total load:")
        print(f"  balancedness {b.aggregate:.4f} (initial placement: {base.aggregate:.4f})")
        print(f"  per layer: {_floats(b.per_layer)}")
    return 0


def _layers_to_list(args: argparse.Namespace, num_layers: int) -> list[int]:
    from eplb.errors import EPLBError

    if args.all_layers:
        return list(range(num_layers))
    if args.layer:
        bad = [i for i in args.layer if not 0 <= i < num_layers]
        if bad:
            raise EPLBError(f"--layer {bad[0]} is outside [0, {num_layers})")
        return list(dict.fromkeys(args.layer))
    return list(range(num_layers)) if num_layers <= 4 else [0]


def _run_demo(argv: list[str]) -> int:
    import importlib

    try:
        # import_module reads sys.modules first (the package attribute may be stale).
        demo = importlib.import_module("eplb.demo")
    except ModuleNotFoundError as exc:
        from eplb.errors import EPLBError

        if exc.name == "eplb.demo":
            raise EPLBError(
                "the demo is not available in this install of eplb (module eplb.demo is missing)"
            ) from None
        raise EPLBError(
            f"the demo needs the package {exc.name!r}; install it (pip install 'eplb[dev]')"
        ) from None
    return int(demo.main(argv) or 0)


def _describe(source: str, trace) -> str:
    return f"{source} ({trace.steps} steps, {trace.num_layers} layers, {trace.num_logical} experts)"


def _floats(values, limit: int = 16) -> str:
    items = [f"{v:.3f}" for v in values.tolist()]
    return " ".join(items[:limit]) + (f" ... ({len(items)} layers)" if len(items) > limit else "")


if __name__ == "__main__":
    sys.exit(main())
