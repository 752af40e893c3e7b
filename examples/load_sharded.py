"""Build a MoE model on the meta device on every rank, load only this rank's experts from a sharded
safetensors checkpoint, run, rebalance, and push a trainer's updated weights into every replica.

Run (CPU, gloo, 2 ranks; the script starts its ranks itself)::

    python examples/load_sharded.py

or under torchrun, on as many ranks as divide the slots (``P = 8 + 4 = 12``)::

    torchrun --nproc-per-node 4 examples/load_sharded.py

Steps:

1. Rank 0 saves a small Qwen3-MoE model (random weights, 2 MoE layers of 8 experts) with
   transformers' ``save_pretrained`` in shards: one key per expert and projection, as checkpoints
   of real models are stored.
2. Every rank builds the same architecture under ``eplb.meta_parameters()`` (no memory for
   weights), wraps it with ``device="cpu"`` (only this rank's ``S`` slots per layer are
   allocated) and loads the checkpoint: each rank reads the dense tensors and only the expert
   rows its slots hold.
3. Every rank runs its own batches; every 4 steps the wrapper rebalances and experts move between
   ranks. Each output is checked against the full model (kept on every rank for this check only).
4. A "trainer" produces new weights (the same on every rank here); ``load_logical_state_dict``
   pushes them into every replica, wherever the rebalances put it; outputs are checked again.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb import EPLBConfig, EPLBWrapper, meta_parameters

NUM_EXPERTS, REDUNDANT, STEPS, STEP_INTERVAL = 8, 4, 12, 4


def model_config():
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
    )  # fmt: skip


def build_full(seed: int = 0):
    """The model as the trainer has it: every expert, real weights. Experts 0 and 1 are made popular
    so that rebalancing has something to do."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(model_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[:2] += 0.3
    return model


def trainer_update(model, version: int):
    """The next weights from a trainer: every floating tensor scaled by 1 + 2% noise."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for t in new.state_dict().values():
            t.mul_(1 + 0.02 * torch.randn(t.shape, generator=gen).to(t.dtype))
    return new


def batch(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 64, (1, 5 + 2 * rank), generator=gen)


def run(rank: int, folder: str) -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    group = dist.group.WORLD
    num_ranks = dist.get_world_size()
    full = build_full()  # for the output checks only
    if rank == 0:
        full.save_pretrained(folder, max_shard_size="100KB")
    dist.barrier()

    # Step 2: meta model, wrapped with device=, filled from the checkpoint.
    import transformers

    with meta_parameters():
        model = transformers.Qwen3MoeForCausalLM(model_config()).eval()
    config = EPLBConfig(num_redundant_experts=REDUNDANT, use_async=False, step_interval=STEP_INTERVAL)
    wrapper = EPLBWrapper(model, config, ep_group=group, device="cpu")
    report = wrapper.load_logical_state_dict(folder)
    slots = wrapper.eplb_layers[0].slots_per_rank
    print(
        f"rank {rank}: {slots} of {NUM_EXPERTS + REDUNDANT} slots per layer; read {report.expert_rows_read} "
        f"expert rows ({report.bytes_read / 2**10:.0f} KiB in all) from {folder}",
        flush=True,
    )

    # Step 3: run and rebalance; every output must equal the full model's.
    reference = full
    with torch.no_grad():
        for step in range(STEPS):
            if step == STEPS // 2:
                # Step 4: the trainer's new weights land in every replica.
                reference = trainer_update(full, version=1)
                wrapper.load_logical_state_dict(reference.state_dict())
            x = batch(rank, step)
            torch.testing.assert_close(wrapper(x).logits, reference(x).logits)
    stats = wrapper.stats(reduce=True)
    if rank == 0:
        print(
            f"{num_ranks} ranks, {STEPS} steps, {stats['num_rebalances']} rebalances, weights pushed once: "
            "every output equals the full model's",
            flush=True,
        )
    wrapper.close()


def _spawned(rank: int, num_ranks: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks)
    try:
        run(rank, folder)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        folder = os.environ.get("EPLB_EXAMPLE_DIR", os.path.join(tempfile.gettempdir(), "eplb_load_sharded"))
        try:
            run(dist.get_rank(), folder)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_spawned, args=(2, port, folder), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())
