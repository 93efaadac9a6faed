"""Counting the host synchronisations of a piece of code, on any device (the CPU included).

A GPU stalls whenever the host needs a value of a device tensor (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``), a shape that depends on its values (``nonzero``, ``unique``, boolean-mask
indexing) or copies host memory in with a blocking copy (``.to(device)``, or a host index tensor
used on a device tensor). On a machine without a GPU every tensor is on the CPU, so
:class:`HostSyncCounter` tells host tensors from "device" tensors itself: a tensor is *host* when a
factory made it without a ``device`` argument (``torch.randperm(n, generator=g)``,
``torch.arange(n)``, ``torch.tensor(...)``) or an op made it from host tensors only; every other
tensor (the model, the data, whatever was made with ``device=``) counts as on the device.
:func:`agentnet.devices.to_device` (a non-blocking ``.to``) hands a host tensor over to the device.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import weakref
from pathlib import Path
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = str(Path(__file__).resolve().parent.parent)

#: Python-level factories whose result lives where their ``device`` argument says (the host without one).
FACTORIES = {torch.arange, torch.randperm, torch.randint, torch.rand, torch.randn, torch.tensor, torch.as_tensor,
             torch.from_numpy, torch.zeros, torch.ones, torch.full, torch.empty, torch.linspace, torch.eye, torch.multinomial}
#: Aten ops that read device values on the host or size their output by them.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
            "repeat_interleave"}
#: Tensor methods that read a device tensor on the host.
READS = {"tolist", "cpu", "numpy", "item"}


class HostSyncCounter:
    """Counts host synchronisations of device tensors while :attr:`active` (see the module docstring).

    ``events`` maps ``(kind, where)`` to a count, ``where`` being the innermost line of this
    repository that caused it. Use as a context manager around the code to watch; set
    :attr:`active` only around the parts that must not synchronise.
    """

    def __init__(self) -> None:
        self.active = False
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        # id -> weak reference: a WeakSet would compare tensors with ``==`` (elementwise) on a hash clash.
        self._host: dict[int, weakref.ref] = {}
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                if counter.active and name in READS and inputs and not counter.is_host(inputs[0]):
                    counter.record(f"{name}()")
                transfer = name == "to" and inputs and counter.is_host(inputs[0]) and _device_argument(args[1:], kwargs)
                if counter.active and transfer and not kwargs.get("non_blocking", False):
                    counter.record("blocking host-to-device copy")
                out = func(*args, **kwargs)
                outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                if func in FACTORIES:
                    host = kwargs.get("device") is None and not (func in (torch.as_tensor, torch.tensor) and inputs and not counter.is_host(inputs[0]))
                elif transfer:
                    host = False
                else:
                    host = bool(inputs) and all(counter.is_host(t) for t in inputs)
                for t in outputs:
                    counter.mark(t, host)
                return out

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                host = [counter.is_host(t) for t in inputs]
                if counter.active and inputs:
                    op = func.__name__.split(".")[0]
                    sized_by_values = op != "repeat_interleave" or _tensor_repeats(func, args)
                    if op in SYNC_OPS and sized_by_values and not host[0]:
                        counter.record(op)
                    elif op in ("index", "index_put", "index_put_") and not host[0] and _has_mask_index(args):
                        counter.record(f"{op} with a boolean mask")
                    elif any(host) and not all(host) and any(t.dim() > 0 for t, h in zip(inputs, host) if h):
                        counter.record(f"{op}: host tensor used on the device")
                out = func(*args, **kwargs)
                if inputs and all(host):
                    for t in pytree.tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            counter.mark(t, True)
                return out

        self._modes = (Functions(), Ops())

    def is_host(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` counts as a host tensor (see the module docstring)."""
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def mark(self, tensor: torch.Tensor, host: bool) -> None:
        """Count ``tensor`` as a host tensor (or not)."""
        key = id(tensor)
        if not host:
            self._host.pop(key, None)
            return

        def forget(ref: weakref.ref, key: int = key) -> None:
            if self._host.get(key) is ref:
                del self._host[key]

        self._host[key] = weakref.ref(tensor, forget)

    def record(self, kind: str) -> None:
        where = "?"
        for frame in reversed(traceback.extract_stack()[:-1]):
            if frame.filename.startswith(REPO) and "site-packages" not in frame.filename and Path(frame.filename).name != "host_sync.py":
                where = f"{frame.filename[len(REPO) + 1:]}:{frame.lineno}: {frame.line}"
                break
        self.events[(kind, where)] += 1

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Count while inside (the counter must be entered)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def __enter__(self) -> "HostSyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        """One line per kind and place, most frequent first."""
        return "\n".join(f"{n:6d} x {kind} at {where}" for (kind, where), n in self.events.most_common())


def _device_argument(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args)


def _tensor_repeats(func, args: tuple) -> bool:
    """``repeat_interleave`` sizes its output by values only when the repeats are a tensor."""
    if func.__name__.endswith(".Tensor"):  # repeat_interleave(repeats): the counts are the input
        return True
    return len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dim() > 0


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or []))
