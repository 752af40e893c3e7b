"""`TorchP2PCommunicator` on the CPU, for tests: the same protocol (offers, pulls, acks over gloo,
storages exported once, retired when freed, error acks, timeouts) with its five memory hooks
replaced by CPU shared memory. A receiver maps the sender's storage (torch's ``file_system``
sharing) and copies straight out of it, as the CUDA version copies out of an IPC mapping; CPU
copies are synchronous, so the events are not needed.

Import it in the rank function and call `register()` there (not at import: the parent's
registry stays as users see it).
"""

from __future__ import annotations

import torch
import torch.multiprocessing

from eplb.comm import available_communicators, register_communicator
from eplb.comm.p2p import TorchP2PCommunicator

NAME = "torch_p2p_shm"


class ShmP2PCommunicator(TorchP2PCommunicator):
    """`TorchP2PCommunicator` over CPU shared memory. Counts the storages it maps (``opened``)."""

    name = NAME
    device_type = "cpu"

    def __init__(self, **kwargs):
        self.opened: list[tuple] = []
        super().__init__(**kwargs)

    def _export(self, storage):
        # Moving a storage into shared memory swaps its data pointer: tests share the slot tensors
        # (share_slots) before a forward pass can read them from another thread.
        return storage._share_filename_cpu_()

    def _open(self, handle):
        manager, key, size = handle
        self.opened.append(handle)
        storage = torch.UntypedStorage._new_shared_filename_cpu(manager, key, size)
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def _stream(self):
        return None

    def _record(self, stream):
        return None, b""

    def _wait(self, stream, handle):
        pass


def register() -> None:
    """Register ``torch_p2p_shm`` (idempotent) and use file-system sharing in this process."""
    torch.multiprocessing.set_sharing_strategy("file_system")
    if NAME not in available_communicators():
        register_communicator(NAME)(ShmP2PCommunicator)


def share_slots(layers) -> None:
    """Move every slot tensor of ``layers`` into shared memory, in place (before any thread reads it)."""
    with torch.no_grad():
        for layer in layers:
            for t in layer.slot_tensors().values():
                t.share_memory_()
