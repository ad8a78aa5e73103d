"""``python -m trainer ARGS`` (and ``torchrun [--nnodes N] --nproc-per-node G -m trainer ARGS``, ``srun python -m trainer ARGS``).

The same options and exit codes as ``ckpt-ledger train``; under torchrun each process is
one worker; under a multi-task srun each task is one worker, or with ``--nproc G`` (or
``--max-restarts``) its node's launcher (see :mod:`trainer.slurm`).
"""

import sys

from cli.main import main

sys.argv[1:1] = ["train"]
main()
