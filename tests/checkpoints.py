"""Checkpoint helpers for the tests: write a model as sharded safetensors with an index, and make
a trainer's "next version" of a model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_sharded(model: torch.nn.Module, folder: Path) -> str:
    """Two safetensors files and a model.safetensors.index.json, as transformers writes them
    (a tied tensor is written once, under its first name). Returns the folder."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    seen, keys = set(), []
    for k, v in model.state_dict().items():
        if id(v) not in seen:
            seen.add(id(v))
            keys.append(k)
    half = len(keys) // 2
    weight_map = {}
    parts = (("model-00001-of-00002.safetensors", keys[:half]), ("model-00002-of-00002.safetensors", keys[half:]))
    for name, part in parts:
        save_file({k: state[k] for k in part}, str(Path(folder) / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


def updated(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every floating tensor of 16 bits or more scaled by ``1 + 0.05 * noise``
    (a trainer's next weights; float8 weights and their scales keep their range)."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in new.state_dict().values():
            if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
                t.mul_(1 + torch.randn(t.shape, generator=gen).to(t.dtype) * 0.05)
    return new
