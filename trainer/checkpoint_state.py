"""How a user's ``state`` mapping becomes one DCP checkpoint, and is put back from one.

``state`` maps names to the things a loop trains with::

    {"model": model, "optim": optimizer, "sched": scheduler, "data": my_loader}

* ``nn.Module`` (plain, DDP, FSDP2, tensor-parallel): its state dict through DCP's
  ``get_state_dict``/``set_state_dict``, sharded where the module is sharded, so a
  checkpoint reshards across world sizes and stacks;
* ``torch.optim.Optimizer``: paired with the module whose parameters it steps (DCP
  keys optimizer state by parameter name, not by position);
* LR schedulers: identical on every rank, saved once;
* anything else with ``state_dict()``/``load_state_dict()`` (a data loader, a
  sampler, a counter): rank-local, saved per rank;
* and, always, every rank's random generators (Python, NumPy, torch, CUDA).

Layout inside the DCP checkpoint (the one the Trainer has always written)::

    <module key>   tensors of the module's state dict
    <optim key>    tensors of the optimizer's state dict
    trainer        bytes: {"step": N, <scheduler key>: state, ...}    identical on every rank
    ranks.r<N>     bytes: {"rng": ..., <rank-local key>: state, ...}  one key per rank
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainer.checkpointing import Candidate
from trainer.errors import BadInputError
from trainer.train_state import UnsafeCheckpointError, capture_rng, from_bytes, rank_key, restore_rng, to_bytes

#: Names the layout itself uses; a state key may not take them.
RESERVED_KEYS = frozenset({"trainer", "ranks", "step", "rng"})


class StateDictIO(Protocol):
    """How a (module, optimizer) pair moves in and out of checkpoint form. Stacks implement it."""

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state dicts in checkpoint form."""

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optim_state: dict) -> None:
        """Put loaded model and optimizer state back."""

    def load_full_model_state(self, model: nn.Module, full_state: dict) -> None:
        """Load a consolidated, plain-keyed model state dict (``pretrained=`` weights)."""


class DCPStateDicts:
    """The default :class:`StateDictIO`: DCP's own functions, which handle DDP, FSDP2 and DTensor."""

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """DCP's ``get_state_dict``."""
        return get_state_dict(model, optimizer)

    def load_state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optim_state: dict) -> None:
        """DCP's ``set_state_dict``, strict."""
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(strict=True))

    def load_full_model_state(self, model: nn.Module, full_state: dict) -> None:
        """DCP's ``set_model_state_dict`` from a full (unsharded) state dict, strict."""
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, strict=True))


def _is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _is_scheduler(value: object) -> bool:
    return isinstance(value, (LRScheduler, ReduceLROnPlateau))


@dataclass(slots=True)
class TrainingState:
    """A validated ``state`` mapping, sorted into what is saved how."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, tuple[torch.optim.Optimizer, str]] = field(default_factory=dict)
    """Optimizer key -> (optimizer, key of the module it steps)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Identical on every rank (LR schedulers): saved once."""
    rank_local: dict[str, Any] = field(default_factory=dict)
    """Everything else with a state dict: saved per rank."""

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> "TrainingState":
        """Sort ``state``; raises :class:`BadInputError` naming the first unusable entry."""
        if not isinstance(state, Mapping) or not state:
            raise BadInputError(f"state must be a non-empty dict of name -> model/optimizer/stateful object, "
                                f"got {type(state).__name__}")
        sorted_state = cls()
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for key, value in state.items():
            if not isinstance(key, str) or not key or "." in key or "/" in key:
                raise BadInputError(f"state key {key!r}: use a non-empty name without '.' or '/'")
            if key in RESERVED_KEYS:
                raise BadInputError(f"state key {key!r} is reserved by the checkpoint layout; rename it")
            if isinstance(value, nn.Module):
                sorted_state.modules[key] = value
            elif isinstance(value, torch.optim.Optimizer):
                optimizers[key] = value
            elif _is_scheduler(value):
                sorted_state.shared[key] = value
            elif _is_stateful(value):
                sorted_state.rank_local[key] = value
            else:
                raise BadInputError(
                    f"state[{key!r}] ({type(value).__name__}) has no state_dict()/load_state_dict(); pass a module, "
                    "an optimizer, a scheduler or an object with both methods")
        for key, optimizer in optimizers.items():
            sorted_state.optimizers[key] = (optimizer, sorted_state._owner_of(key, optimizer))
        owners = [owner for _, owner in sorted_state.optimizers.values()]
        for owner in set(owners):
            if owners.count(owner) > 1:
                keys = [k for k, (_, o) in sorted_state.optimizers.items() if o == owner]
                raise BadInputError(f"state keys {', '.join(map(repr, keys))} are optimizers of the same module "
                                    f"{owner!r}; give each module one optimizer")
        return sorted_state

    def _owner_of(self, key: str, optimizer: torch.optim.Optimizer) -> str:
        """The module whose parameters ``optimizer`` steps (DCP names optimizer state after them)."""
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module_key, module in self.modules.items():
            if params <= {id(p) for p in module.parameters()}:
                return module_key
        raise BadInputError(f"state[{key!r}]: the optimizer's parameters do not all belong to one nn.Module of "
                            f"state ({', '.join(map(repr, self.modules)) or 'none given'}); add that model to state")

    # -- to and from checkpoint form ------------------------------------------------------------

    def module_states(self, io: StateDictIO) -> dict[str, dict]:
        """Every module's and optimizer's state dict in checkpoint form (collective for sharded modules)."""
        out: dict[str, dict] = {}
        stepped = {owner: (key, optimizer) for key, (optimizer, owner) in self.optimizers.items()}
        for module_key, module in self.modules.items():
            if module_key in stepped:
                optim_key, optimizer = stepped[module_key]
                out[module_key], out[optim_key] = io.state_dicts(module, optimizer)
            else:
                out[module_key] = get_model_state_dict(module)
        return out

    def pack(self, io: StateDictIO, *, step: int, rank: int) -> dict[str, Any]:
        """What one rank hands to DCP for a checkpoint at ``step``."""
        shared = {"step": step, **{key: obj.state_dict() for key, obj in self.shared.items()}}
        local = {"rng": capture_rng(), **{key: obj.state_dict() for key, obj in self.rank_local.items()}}
        return {**self.module_states(io), "trainer": to_bytes(shared), "ranks": {rank_key(rank): to_bytes(local)}}

    def template(self, io: StateDictIO, *, source_rank: int) -> dict[str, Any]:
        """The structure DCP loads into (tensors filled in place, ``bytes`` items replaced)."""
        return {**self.module_states(io), "trainer": b"", "ranks": {rank_key(source_rank): b""}}

    def apply(self, io: StateDictIO, loaded: dict[str, Any], *, source_rank: int, checkpoint_id: str) -> int:
        """Put a loaded template back into the live objects; returns the checkpoint's step."""
        stepped = {owner: (key, optimizer) for key, (optimizer, owner) in self.optimizers.items()}
        for module_key, module in self.modules.items():
            if module_key in stepped:
                optim_key, optimizer = stepped[module_key]
                io.load_state_dicts(module, optimizer, loaded[module_key], loaded[optim_key])
            else:
                set_model_state_dict(module, loaded[module_key], options=StateDictOptions(strict=True))
        shared = from_bytes(loaded["trainer"], "trainer")
        local = from_bytes(loaded["ranks"][rank_key(source_rank)], f"ranks.{rank_key(source_rank)}")
        for saved, objects in ((shared, self.shared), (local, self.rank_local)):
            for key, obj in objects.items():
                if key not in saved:
                    known = sorted(k for k in saved if k not in RESERVED_KEYS)
                    raise BadInputError(f"state[{key!r}] is not in checkpoint {checkpoint_id} (it saved "
                                        f"{', '.join(map(repr, known)) or 'no such objects'}); remove it from state "
                                        "or start a new run")
                obj.load_state_dict(saved[key])
        restore_rng(local["rng"])
        return int(shared["step"])

    def only_module(self, what: str) -> nn.Module:
        """The single module of ``state`` (``what`` names the option that needs it)."""
        if len(self.modules) != 1:
            raise BadInputError(f"{what} needs exactly one nn.Module in state, found "
                                f"{len(self.modules)} ({', '.join(map(repr, self.modules)) or 'none'})")
        return next(iter(self.modules.values()))


# -- a load that failed ----------------------------------------------------------------------------


def is_layout_error(err: BaseException) -> bool:
    """Whether a failed load is about the checkpoint's contents, not about a lost peer."""
    causes = [failure[0] for failure in err.failures.values()] if isinstance(err, CheckpointException) else [err]
    return not any(isinstance(cause, dist.DistError) for cause in causes)


def load_failure_reason(err: BaseException) -> str:
    """The first cause of a failed load, on one line."""
    if isinstance(err, CheckpointException):
        reason = "; ".join(f"{type(f[0]).__name__}: {f[0]}" for f in list(err.failures.values())[:1])
    else:
        reason = f"{type(err).__name__}: {err}"
    return " ".join(reason.split())[:300]


def unmappable_checkpoint_message(candidate: Candidate, stack: str, world_size: int, topology: dict[str, int],
                                  err: BaseException) -> str:
    """One line: which layout saved the checkpoint, which one could not load it and why, and what loads it."""
    def layout(stack_name: str, world: int, topo: dict[str, int]) -> str:
        return f"--stack {stack_name} --nproc {world} --tp {topo.get('tp', 1)} --pp {topo.get('pp', 1)}"

    saved = layout(candidate.stack, candidate.world_size, candidate.topology)
    return (f"checkpoint {candidate.checkpoint_id} (step {candidate.step}) was saved by {saved} and cannot be "
            f"resharded to {layout(stack, world_size, topology)} ({load_failure_reason(err)}); "
            f"resume it with {saved}")


def restore_checkpoint(entries: TrainingState, io: StateDictIO, checkpointer: Any, candidate: Candidate, *,
                       rank: int, layout: tuple[str, int, dict[str, int]]) -> int:
    """Load a verified ``candidate`` into the live objects (collective); returns its step.

    ``layout`` is ``(stack, world_size, topology)`` of this attempt. DCP reshards between
    stacks and world sizes; what it cannot map is refused with the layout that saved the
    checkpoint, and a state that does not fit with the key at fault (lost peers are crashes,
    not refusals, and are raised as they are).
    """
    # With a different world size there is no state of "this rank"; continue rank r from r mod old.
    source_rank = rank % candidate.world_size
    template = entries.template(io, source_rank=source_rank)
    try:
        checkpointer.load(candidate, template)
        return entries.apply(io, template, source_rank=source_rank, checkpoint_id=candidate.checkpoint_id)
    except BadInputError:
        raise
    except (CheckpointException, KeyError, ValueError, RuntimeError) as err:
        causes = [f[0] for f in err.failures.values()] if isinstance(err, CheckpointException) else [err]
        if unsafe := next((c for c in causes if isinstance(c, UnsafeCheckpointError)), None):
            raise unsafe from None  # refused, never executed: one line, exit 1
        if not is_layout_error(err):
            raise
        if layout == (candidate.stack, candidate.world_size, candidate.topology):
            raise BadInputError(f"state does not match checkpoint {candidate.checkpoint_id} (step "
                                f"{candidate.step}): {load_failure_reason(err)}; restore into the model "
                                "that saved it or use a new run_dir") from None
        raise BadInputError(unmappable_checkpoint_message(candidate, *layout, err)) from None

