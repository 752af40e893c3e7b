"""Executors: apply a planned placement to the layers, moving weights between ranks.

One protocol (`Executor`: begin, on_step, drain, close) and two executors: `SyncExecutor`
moves every layer at once and blocks (begin + drain); `AsyncExecutor` plans and moves on a
background thread (and a side CUDA stream) and commits one layer at a time at step boundaries.
Both stage and commit a layer through `eplb.executor.staging`; the async one agrees on its
progress through `eplb.executor.agreement`.
"""

from eplb.executor.async_executor import AsyncExecutor
from eplb.executor.base import Executor
from eplb.executor.report import RebalanceReport, StepOutcome
from eplb.executor.sync import SyncExecutor

__all__ = ["Executor", "RebalanceReport", "SyncExecutor", "AsyncExecutor", "StepOutcome"]
