"""The thin trainer: one lifecycle, pluggable parallelism stacks, every fact recorded in the ledger.

>>> from trainer import Trainer, TrainerConfig
>>> from trainer.default_job import default_job
>>> model_fn, data_fn, loss_fn, job = default_job()
>>> Trainer(TrainerConfig(run_dir="runs/a", stack="fsdp", job=job),
...         model_fn=model_fn, data_fn=data_fn, loss_fn=loss_fn).fit()   # doctest: +SKIP
"""

from trainer.checkpoint_manager import CheckpointManager, SaveResult, SaveStatus
from trainer.config import TrainerConfig
from trainer.errors import BadInputError, StartRefusedError, TrainerError
from trainer.trainer import RunOutcome, Trainer

__all__ = [
    "BadInputError", "CheckpointManager", "RunOutcome", "SaveResult", "SaveStatus", "StartRefusedError", "Trainer",
    "TrainerConfig", "TrainerError",
]
