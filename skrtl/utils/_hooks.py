"""Forward hooks that are always removed, and the small hooks skrtl needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["StopForward", "call_order", "capture_outputs", "forward_hooks", "stop_after"]


class StopForward(Exception):
    """Raised by a hook to skip the rest of a forward pass (see :func:`stop_after`)."""


@contextmanager
def forward_hooks(
    hooks: Iterable[tuple[nn.Module, Callable]], *, pre: bool = False
) -> Iterator[list]:
    """Register forward (or forward-pre) hooks for the ``with`` block, then remove them.

    Parameters
    ----------
    hooks : iterable of (module, hook)
        ``hook(module, args, output)`` (or ``hook(module, args)`` with ``pre=True``).
    pre : bool, default=False
        Register forward-pre hooks.

    Yields
    ------
    list of torch.utils.hooks.RemovableHandle
    """
    handles = []
    try:
        for module, hook in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class capture_outputs:  # noqa: N801 - a hook object named like the function it acts as
    """Forward hook object storing each named module's output in ``store[name]``."""

    def __init__(self, store: dict, name: str):
        self.store = store
        self.name = name

    def __call__(self, module, args, output):
        self.store[self.name] = output


def call_order(model: nn.Module, probe: torch.Tensor, *, forward: Callable | None = None) -> dict:
    """Position of the first call of every named module during one no-grad forward pass.

    Parameters
    ----------
    model : torch.nn.Module
    probe : torch.Tensor
        Input of the pass.
    forward : callable, optional
        ``forward(model, probe)``; default ``model(probe)``.

    Returns
    -------
    dict of str to int
        Module name -> call position (modules that were not called are absent).
    """
    order: dict[str, int] = {}

    def make(name):
        def hook(mod, args, out):
            order.setdefault(name, len(order))

        return hook

    pairs = [(mod, make(name)) for name, mod in model.named_modules() if name]
    with forward_hooks(pairs), torch.no_grad():
        (forward or (lambda m, x: m(x)))(model, probe)
    return order


def _raise_stop(module, args, output):
    raise StopForward


def stop_after(module: nn.Module):
    """Register a permanent hook that ends every forward pass after ``module`` (a handle)."""
    return module.register_forward_hook(_raise_stop)
