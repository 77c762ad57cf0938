"""Counting what would stall a GPU, on any device: operators that force a host sync.

On CUDA a host sync (the CPU waiting for the GPU) happens when a value must come back to
Python (``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``) or when an output's size
depends on the data (``nonzero``, ``masked_select``, indexing with a boolean mask); a tensor
built from Python data (``torch.tensor([...])``) costs a host-to-device copy each time.
:class:`SyncCounter` sees those operators as they are dispatched, so a CPU run counts what
a GPU run of the same code would sync on. ``torch.cuda.set_sync_debug_mode`` checks the
same on a real GPU.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operators whose result the host must wait for, or whose output size depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "item",  # .item(), float(t), int(t), bool(t)
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.lift_fresh.default: "tensor_from_python",  # torch.tensor(...) / torch.as_tensor(...)
    aten.lift_fresh_copy.default: "tensor_from_python",
}

#: Reads of CPU-held counters inside torch.optim (AdamW's step count): no GPU work is waited on.
EXCEPTED_FILES = ("torch/optim/",)


INDEX_OPS = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default)


def _bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    if func not in INDEX_OPS:
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class SyncCounter(TorchDispatchMode):
    """Counts sync-forcing operators by kind; ``where`` keeps the first call site of each kind.

    Calls made from inside ``torch.optim`` are left out (see ``EXCEPTED_FILES``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: dict[str, str] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kind = SYNC_OPS.get(func) or ("boolean_index" if _bool_index(func, args) else None)
        if kind is not None:
            self._count(kind)
        return func(*args, **(kwargs or {}))

    def _count(self, kind: str) -> None:
        stack = traceback.extract_stack()[:-2]
        files = [frame.filename.replace("\\", "/") for frame in stack]
        if any(part in name for name in files for part in EXCEPTED_FILES):
            return
        self.counts[kind] += 1
        if kind not in self.where:
            # The innermost frame outside torch and this module: the code that asked.
            ours = [f for f, name in zip(stack, files, strict=True) if "/torch/" not in name]
            caller = (ours or stack)[-1]
            self.where[kind] = f"{caller.filename}:{caller.lineno} ({caller.line})"
