"""``tppp``: tensor parallelism inside pipeline stages, data parallelism across pipeline replicas.

The world is a 3-D mesh ``(pp, dp, tp)`` with ``dp = world_size / (tp * pp)``; ``tp`` is
innermost, so tensor-parallel peers are neighbouring ranks.

* ``pp``: the model's ``blocks`` are cut into ``pp`` contiguous slices. The stage on pp
  rank *i* keeps slice *i*; the first stage also keeps the input layers (embeddings),
  the last one the output layers (final norm, head). Stages run under a
  ``torch.distributed.pipelining`` schedule (``1F1B`` by default, or ``GPipe``) over
  ``microbatches`` microbatches; the loss exists only on the last stage and is
  broadcast to the others.
* ``tp``: inside a stage the attention projections and the MLP are column/row-parallel
  DTensor layers, the token embedding is vocabulary-sharded and the head is
  column-sharded with gathered logits. Dropout masks must agree between tensor-parallel
  peers (their activations are replicas), so each step runs on a random stream the
  ``tp`` group shares.
* ``dp``: each pipeline replica reads its own slice of the data; gradients are averaged
  over the ``dp`` group after the backward, and reported losses are ``dp`` means.

Checkpoints: a stage registers its layers under their names in the *unsplit* model
(blocks keep their original index), so each stage's state dict holds exactly the keys
the ``ddp``/``fsdp`` stacks produce for the same parameters, and tensor-parallel
parameters are DTensors. The optimizer's ``param_groups`` are merged over the stages
before saving, so a ``tppp`` checkpoint has the ``ddp``/``fsdp`` layout and DCP reshards
it to any stack and world size (and back).

Model contract (the default job's ``TinyLM`` meets it): ``blocks`` (an ``nn.ModuleList``),
``embed(inputs) -> hidden`` and ``project(hidden) -> output``, and ``input_layers`` /
``output_layers`` naming the children those two use. For ``tp > 1`` the blocks have
the linear layers named in :data:`BLOCK_PLAN` and a ``heads`` count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from trainer.stacks.base import LossFn, Stack, Topology

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

    from trainer.config import TrainerConfig

#: Pipeline schedules by name (``schedule=`` of :class:`TpppStack`): their classes in
#: ``torch.distributed.pipelining``, imported only when a pipeline is built. That package
#: loads ``torch._dynamo`` (~0.5 s), which every ``ckpt-ledger train`` and ``export`` paid
#: at start-up whatever its stack, because the stack registry imports this module.
SCHEDULES = {"1F1B": "Schedule1F1B", "GPipe": "ScheduleGPipe"}

#: Tensor-parallel layout of one block: Megatron-style column-then-row pairs, so each
#: pair needs one all-reduce forward and one backward (attention heads split over tp).
BLOCK_PLAN: dict[str, type[ParallelStyle]] = {
    "wq": ColwiseParallel, "wk": ColwiseParallel, "wv": ColwiseParallel, "wo": RowwiseParallel,
    "w1": ColwiseParallel, "w2": RowwiseParallel,
}


def stage_blocks(num_blocks: int, pp: int) -> list[range]:
    """Contiguous block indices of each of ``pp`` stages, as even as possible (earlier stages get the extra)."""
    base, extra = divmod(num_blocks, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


class PipelineStageModule(nn.Module):
    """One pipeline stage: a contiguous slice of ``blocks`` plus, on the first and last stage, the
    input and output layers, each registered under its name in the unsplit model.

    ``blocks`` becomes an ``nn.ModuleDict`` keyed by the original indices, so ``blocks.2.wq.weight``
    keeps its name on whichever stage holds block 2.
    """

    def __init__(self, model: nn.Module, blocks: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.is_first, self.is_last = first, last
        if first:
            for name in model.input_layers:
                setattr(self, name, getattr(model, name))
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in blocks})
        if last:
            for name in model.output_layers:
                setattr(self, name, getattr(model, name))
        # ``embed``/``project`` are the model's own code. The model object stays reachable for
        # them but outside the module tree (its kept layers are registered above), stripped of
        # the layers other stages own so they can be freed.
        model.blocks = nn.ModuleList()
        for name in (() if first else model.input_layers) + (() if last else model.output_layers):
            setattr(model, name, None)
        object.__setattr__(self, "_source", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self._source.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self._source.project(x)
        return x


@dataclass(slots=True)
class _Layout:
    """What :meth:`TpppStack.parallelize` learned about this rank's place and the unsplit model."""

    module: nn.Module
    topology: Topology
    pp_rank: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    full_keys: list[str]
    """State-dict keys of the unsplit model, in its order."""
    stage: PipelineStage | None = None
    schedule: Any = None
    schedule_loss_fn: LossFn | None = None

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.topology.pp - 1


class TpppStack(Stack):
    """Tensor + pipeline parallelism with data-parallel replicas (see the module docstring)."""

    name = "tppp"
    max_tp: ClassVar[int | None] = None
    max_pp: ClassVar[int | None] = None

    def __init__(self, *, schedule: str = "1F1B", microbatches: int | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if microbatches is not None and (isinstance(microbatches, bool) or not isinstance(microbatches, int)
                                         or microbatches < 1):
            raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
        self.schedule = schedule
        """Pipeline schedule name, a key of :data:`SCHEDULES`."""
        self.microbatches = microbatches
        """Microbatches per step (``None``: one per pipeline stage)."""
        self._layout: _Layout | None = None

    @classmethod
    def from_config(cls, config: TrainerConfig) -> TpppStack:
        """``schedule`` and ``microbatches`` from the run's ``pp_schedule`` and ``pp_microbatches``."""
        return cls(schedule=config.pp_schedule, microbatches=config.pp_microbatches)

    # -- topology and validation (no process group needed) ----------------------------------------

    def topology(self, world_size: int, *, tp: int = 1, pp: int = 1) -> Topology:
        """``dp = world_size / (tp * pp)``; also checks the microbatch count against ``pp``."""
        topology = super().topology(world_size, tp=tp, pp=pp)
        if self.schedule == "1F1B" and self.microbatches is not None and self.microbatches < pp:
            raise ValueError(f"the 1F1B schedule needs at least pp={pp} microbatches, got {self.microbatches}")
        return topology

    def check_model(self, model: nn.Module, topology: Topology) -> None:
        """Raise ``ValueError`` unless ``model`` splits into ``topology.pp`` stages and ``topology.tp`` shards."""
        kind = type(model).__name__
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"stack 'tppp' splits a model's `blocks` (an nn.ModuleList) into pipeline stages; "
                             f"{kind} has no such attribute")
        if len(blocks) < topology.pp:
            raise ValueError(f"{kind} has {len(blocks)} blocks and cannot be split into pp={topology.pp} "
                             f"pipeline stages; use --pp {len(blocks)} or fewer")
        for attr in ("embed", "project", "input_layers", "output_layers"):
            if not hasattr(model, attr):
                raise ValueError(f"stack 'tppp' needs {kind}.{attr} to run the model as pipeline stages")
        if topology.tp > 1:
            _check_tensor_parallel(model, topology.tp)

    # -- building ---------------------------------------------------------------------------------

    def build_mesh(self, topology: Topology, device_type: str) -> DeviceMesh:
        """``(pp, dp, tp)``, tensor-parallel innermost."""
        return init_device_mesh(device_type, (topology.pp, topology.dp, topology.tp), mesh_dim_names=("pp", "dp", "tp"))

    def parallelize(self, model: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """Keep this pp rank's stage of ``model``, shard it over ``tp``; returns the stage module."""
        topology = Topology(tp=mesh["tp"].size(), pp=mesh["pp"].size(), dp=mesh["dp"].size())
        self.check_model(model, topology)
        full_keys = list(model.state_dict())
        device = next(model.parameters()).device
        pp_rank = mesh["pp"].get_local_rank()
        stage = PipelineStageModule(model, stage_blocks(len(model.blocks), topology.pp)[pp_rank],
                                    first=pp_rank == 0, last=pp_rank == topology.pp - 1)
        if topology.tp > 1:
            parallelize_module(stage, mesh["tp"], _tensor_parallel_plan(stage))
        layout = _Layout(module=stage, topology=topology, pp_rank=pp_rank, pp_group=mesh["pp"].get_group(),
                         dp_group=mesh["dp"].get_group(), tp_group=mesh["tp"].get_group(), full_keys=full_keys)
        if topology.pp > 1:
            from torch.distributed.pipelining import PipelineStage

            layout.stage = PipelineStage(stage, pp_rank, topology.pp, device, group=layout.pp_group)
        self._layout = layout
        return stage

    # -- stepping ---------------------------------------------------------------------------------

    def train_step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """One pipeline step (forward and backward of every microbatch), then the dp gradient average.

        Returns the loss of the whole batch averaged over the ``dp`` replicas: the same number on every rank.
        """
        layout = self._require(model)
        with self._tensor_parallel_rng(layout, inputs.device):
            if layout.stage is None:
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                loss = loss.detach()
            else:
                loss = self._run_pipeline(layout, inputs, targets, loss_fn, train=True)
        self._average_gradients(layout)
        return self._replica_mean(layout, loss)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """Forward-only pipeline pass; the loss averaged over the ``dp`` replicas, the same on every rank."""
        layout = self._require(model)
        if layout.stage is None:
            loss = loss_fn(model(inputs), targets).detach()
        else:
            loss = self._run_pipeline(layout, inputs, targets, loss_fn, train=False)
        return self._replica_mean(layout, loss)

    def _run_pipeline(self, layout: _Layout, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                      train: bool) -> torch.Tensor:
        schedule = self._schedule_for(layout, loss_fn, inputs.shape[0])
        losses: list[torch.Tensor] = []
        args = (inputs,) if layout.pp_rank == 0 else ()
        target = targets if layout.is_last else None
        run = schedule.step if train else schedule.eval
        run(*args, target=target, losses=losses if layout.is_last else None)
        if layout.is_last:
            # Equal microbatches of a mean loss: their mean is the whole batch's mean.
            loss = torch.stack([mb.detach() for mb in losses]).mean().to(torch.float32)
        else:
            loss = torch.zeros((), dtype=torch.float32, device=inputs.device)
        dist.broadcast(loss, group=layout.pp_group, group_src=layout.topology.pp - 1)
        return loss

    def _schedule_for(self, layout: _Layout, loss_fn: LossFn, batch_size: int) -> Any:
        count = self.microbatches or layout.topology.pp
        if batch_size % count:
            raise ValueError(f"a batch of {batch_size} does not split into {count} equal pipeline microbatches")
        if layout.schedule is None or layout.schedule_loss_fn is not loss_fn:
            import torch.distributed.pipelining as pipelining

            schedule = getattr(pipelining, SCHEDULES[self.schedule])
            layout.schedule = schedule(layout.stage, n_microbatches=count, loss_fn=loss_fn)
            layout.schedule_loss_fn = loss_fn
        return layout.schedule

    @staticmethod
    @contextmanager
    def _tensor_parallel_rng(layout: _Layout, device: torch.device) -> Iterator[None]:
        """Run the step on a random stream shared by the ``tp`` group (identical dropout masks on replicas).

        Each rank still draws the stream's seed from its own generator, so the global generators
        advance as they would without tensor parallelism and resume bitwise from a checkpoint.
        """
        if layout.topology.tp == 1:
            yield
            return
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        dist.broadcast(seed, group=layout.tp_group, group_src=0)
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            yield

    @staticmethod
    @torch.no_grad()
    def _average_gradients(layout: _Layout) -> None:
        """Average gradients over the ``dp`` replicas in one flat all-reduce."""
        dp = layout.topology.dp
        if dp == 1:
            return
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in layout.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=layout.dp_group)
        flat.div_(dp)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    @staticmethod
    def _replica_mean(layout: _Layout, loss: torch.Tensor) -> torch.Tensor:
        if layout.topology.dp > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=layout.dp_group)
            loss.div_(layout.topology.dp)
        return loss

    # -- state ------------------------------------------------------------------------------------

    def state_dicts(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """This stage's model and optimizer state under the unsplit model's names (collective over ``pp``).

        ``param_groups`` list every parameter of the whole model (merged over the stages), so
        every rank saves the same object and the layout is the one ``ddp``/``fsdp`` save;
        loading picks this stage's parameters out of it.
        """
        layout = self._require(model)
        model_state, optim_state = get_state_dict(model, optimizer)
        optim_state["param_groups"] = _merge_param_groups(optim_state["param_groups"], layout)
        return model_state, optim_state

    def full_model_state(self, model: nn.Module) -> dict:
        """The consolidated, plain-keyed state dict of the unsplit model on every rank (CPU copies)."""
        layout = self._require(model)
        local = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        # Copies: a snapshot must not follow the live (replicated, unsharded) parameters.
        local = {key: value.detach().to("cpu", copy=True) for key, value in local.items()}
        parts = [local]
        if layout.topology.pp > 1:
            parts = [None] * layout.topology.pp
            dist.all_gather_object(parts, local, group=layout.pp_group)
        merged = {key: value for part in parts for key, value in part.items()}
        return {key: merged[key] for key in layout.full_keys}

    def load_full_model_state(self, model: nn.Module, full_state: dict) -> None:
        """Load an unsplit model's state dict: each stage takes its keys, tp shards are cut from the full tensors."""
        layout = self._require(model)
        missing = [key for key in layout.full_keys if key not in full_state]
        unexpected = [key for key in full_state if key not in set(layout.full_keys)]
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        local = {key: full_state[key] for key in model.state_dict()}
        set_model_state_dict(model, local, options=StateDictOptions(full_state_dict=True, strict=True))

    def _require(self, model: nn.Module) -> _Layout:
        if self._layout is None or self._layout.module is not model:
            raise RuntimeError("TpppStack: this model was not built by this stack's parallelize()")
        return self._layout


def _merge_param_groups(groups: list[dict], layout: _Layout) -> list[dict]:
    """Every stage's optimizer groups as one whole-model list (group *i* holds group *i* of every stage)."""
    if layout.topology.pp == 1:
        return groups
    everyone: list[Any] = [None] * layout.topology.pp
    dist.all_gather_object(everyone, groups, group=layout.pp_group)
    if len({len(stage_groups) for stage_groups in everyone}) != 1:
        raise RuntimeError("pipeline stages have different numbers of optimizer param groups; cannot merge them")
    merged = []
    for index, group in enumerate(everyone[0]):
        merged.append({**group, "params": [fqn for stage_groups in everyone for fqn in stage_groups[index]["params"]]})
    return merged


def _tensor_parallel_plan(stage: PipelineStageModule) -> dict[str, ParallelStyle]:
    """The DTensor plan of one stage, keyed by submodule name."""
    plan: dict[str, ParallelStyle] = {}
    if isinstance(getattr(stage, "tok_emb", None), nn.Embedding):
        # Vocabulary-sharded embedding: each rank looks up its rows, partial sums are all-reduced.
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate())
    for index in stage.blocks:
        for name, style in BLOCK_PLAN.items():
            plan[f"blocks.{index}.{name}"] = style()
    if isinstance(getattr(stage, "head", None), nn.Linear):
        # Vocabulary-sharded head; logits are gathered so any loss function works on them.
        plan["head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Every dimension the plan shards must divide by ``tp``."""
    kind = type(model).__name__
    for index, block in enumerate(model.blocks):
        heads = getattr(block, "heads", None)
        if not isinstance(heads, int) or heads % tp:
            raise ValueError(f"{kind}.blocks.{index} has {heads} attention heads; tp={tp} must divide them")
        for name, style in BLOCK_PLAN.items():
            layer = getattr(block, name, None)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{kind}.blocks.{index}.{name} is not an nn.Linear; the tensor-parallel plan shards it")
            width = layer.out_features if style is ColwiseParallel else layer.in_features
            if width % tp:
                raise ValueError(f"{kind}.blocks.{index}.{name} has width {width}, which tp={tp} does not divide")
    for name, attr in (("tok_emb", "num_embeddings"), ("head", "out_features")):
        layer = getattr(model, name, None)
        if layer is not None and getattr(layer, attr, 0) % tp:
            raise ValueError(f"{kind}.{name} has {attr}={getattr(layer, attr)}, which tp={tp} does not divide")
