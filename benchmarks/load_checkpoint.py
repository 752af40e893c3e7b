"""What one rank reads and holds when it loads a logical checkpoint: rows, bytes and time per
rank as the EP group grows, against reading the whole checkpoint.

Run:
    python benchmarks/load_checkpoint.py [--layers 8] [--experts 64] [--hidden 512] [--inter 256]

A stack of `eplb.moe.MoE` layers (SwiGLU experts, float32) is saved as one ``.safetensors`` file.
For each group size ``G`` (one redundant slot per rank), rank 0 of ``G`` is simulated in this
process: its model is built under ``eplb.meta_parameters()``, its layers hold only rank 0's
``S = P // G`` slots, and ``load_logical_state_dict`` reads the file. The table gives the expert
rows and bytes that rank read, the slot memory it holds, and the load's wall time (median of
``--repeats``), next to the file's size.

Legend: L layers, E logical experts, P physical slots, G ranks, S slots per rank.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model

from eplb import meta_parameters
from eplb.checkpoint import LogicalLoader
from eplb.moe import EPLBExperts, MoE, ResidualStack, find_moe_layers
from eplb.placement import Placement


def stack(layers: int, experts: int, hidden: int, inter: int) -> ResidualStack:
    """``layers`` residual `MoE` blocks (top-2)."""
    return ResidualStack(MoE(hidden, inter, experts, 2) for _ in range(layers))


def rank0_load(args, path: Path, num_ranks: int) -> tuple[int, int, int, float]:
    """(rows read, bytes read, slot bytes held, seconds) of rank 0 of ``num_ranks``."""
    with meta_parameters():
        model = stack(args.layers, args.experts, args.hidden, args.inter)
    specs = find_moe_layers(model)
    num_physical = args.experts + num_ranks
    placement = Placement.initial(args.layers, args.experts, num_physical, num_ranks)
    loader = LogicalLoader(model, specs)
    layers = [
        EPLBExperts(
            spec.experts, spec.expert_tensors, layer_index=i, phy2log=placement.phy2log[i],
            num_ranks=num_ranks, rank=0, device="cpu",
        )
        for i, spec in enumerate(specs)
    ]
    loader.materialize(model, torch.device("cpu"))
    times, report = [], None
    for _ in range(args.repeats):
        report = loader.load(path, strict=False, layers=layers, rank=0, before_write=lambda: "none")
        times.append(report.seconds)
    held = sum(t.numel() * t.element_size() for layer in layers for t in layer.slot_tensors().values())
    return report.expert_rows_read, report.bytes_read, held, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = stack(args.layers, args.experts, args.hidden, args.inter)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_model(full, str(path))
        size = path.stat().st_size
        print(f"checkpoint: L={args.layers} E={args.experts} D={args.hidden} I={args.inter}, {size / 2**20:.1f} MiB")
        print("| G | S | expert rows read | MiB read | share of file | slot MiB held | load s |")
        print("|---|---|---|---|---|---|---|")
        for num_ranks in (1, 2, 4, 8, 16):
            if args.experts % num_ranks:
                continue
            rows, nbytes, held, seconds = rank0_load(args, path, num_ranks)
            S = (args.experts + num_ranks) // num_ranks
            print(
                f"| {num_ranks} | {S} | {rows} | {nbytes / 2**20:.1f} | {nbytes / size:.3f} | "
                f"{held / 2**20:.1f} | {seconds:.3f} |"
            )


if __name__ == "__main__":
    main()
