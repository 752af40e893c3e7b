"""Wrap a transformers MoE model with EPLB, rebalance it, and check nothing changed in its outputs.

Runs in a few seconds on a CPU (a tiny Mixtral with random weights; no download)::

    python examples/wrap_transformers.py
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from eplb import EPLBConfig, EPLBWrapper


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).eval()  # random routing is uneven enough to balance
    reference = copy.deepcopy(model)

    # 8 experts + 4 redundant slots; rebalance every 4 forward passes from a window of 8.
    eplb_config = EPLBConfig(num_redundant_experts=4, step_interval=4, window_size=8, use_async=False)
    with EPLBWrapper(model, eplb_config) as wrapper:
        tokens = torch.randint(0, config.vocab_size, (4, 32))
        with torch.no_grad():
            for _ in range(8):  # two rebalances happen on the way (steps 4 and 8)
                logits = wrapper(tokens).logits
            torch.testing.assert_close(logits, reference(tokens).logits)

            # Attributes fall through to the model: generate() works, each forward is one step.
            out = wrapper.generate(tokens[:1, :8], max_new_tokens=4, do_sample=False)
            assert torch.equal(out, reference.generate(tokens[:1, :8], max_new_tokens=4, do_sample=False))

        stats = wrapper.stats()
        print(
            f"steps: {stats['step']}, rebalances: {stats['num_rebalances']}, "
            f"slots changed by the last one: {stats['last_rebalance_slots_changed']}"
        )
        print("replicas per expert, layer 0:", wrapper.placement.logcnt[0].tolist())
        print("window load, layer 0:        ", wrapper.tracker.window_load()[0].tolist())

        # Back to the model's own layout (primary copy of each expert), e.g. to save_pretrained().
        restored = wrapper.unwrap()
    same = all(
        torch.equal(a, b) for a, b in zip(restored.state_dict().values(), reference.state_dict().values())
    )
    print("unwrapped model identical to the original:", same)


if __name__ == "__main__":
    main()
