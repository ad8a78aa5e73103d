"""The stack registry: one entry per parallelism stack.

>>> from trainer.stacks import get_stack
>>> get_stack("fsdp").topology(4)
Topology(tp=1, pp=1, dp=4)

To add a stack, write a :class:`~trainer.stacks.base.Stack` subclass in its own
module and add one :func:`register_stack` line below; the trainer, launcher and CLI
pick it up by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.stacks.base import LossFn, Stack, Topology
from trainer.stacks.ddp import DDPStack
from trainer.stacks.fsdp import FSDPStack
from trainer.stacks.tppp import TpppStack

if TYPE_CHECKING:
    from trainer.config import TrainerConfig

_REGISTRY: dict[str, type[Stack]] = {}

#: Stacks that the CLI accepts and validates but that are not built yet, with why.
PLANNED_STACKS: dict[str, str] = {}


def register_stack(stack: type[Stack]) -> type[Stack]:
    """Make ``stack`` available under ``stack.name`` (a name may be registered once)."""
    if stack.name in _REGISTRY and _REGISTRY[stack.name] is not stack:
        raise ValueError(f"stack name {stack.name!r} is already registered by {_REGISTRY[stack.name].__qualname__}")
    _REGISTRY[stack.name] = stack
    PLANNED_STACKS.pop(stack.name, None)
    return stack


def available_stacks() -> tuple[str, ...]:
    """Names of the registered stacks."""
    return tuple(_REGISTRY)


def get_stack(name: str, config: "TrainerConfig | None" = None) -> Stack:
    """A fresh instance of the stack registered as ``name``, configured by ``config`` when given."""
    try:
        stack = _REGISTRY[name]
    except KeyError:
        if name in PLANNED_STACKS:
            raise ValueError(f"stack {name!r} is not implemented yet: {PLANNED_STACKS[name]}") from None
        raise ValueError(f"unknown stack {name!r}; available: {', '.join(_REGISTRY)}") from None
    return stack() if config is None else stack.from_config(config)


register_stack(DDPStack)
register_stack(FSDPStack)
register_stack(TpppStack)

__all__ = ["PLANNED_STACKS", "LossFn", "Stack", "Topology", "available_stacks", "get_stack", "register_stack"]
