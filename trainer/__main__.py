"""``python -m trainer ARGS`` (and ``torchrun --nproc-per-node N -m trainer ARGS``, ``srun python -m trainer ARGS``).

The same options and exit codes as ``ckpt-ledger train``; under torchrun or a
multi-task srun each process is one worker.
"""

import sys

from cli.main import main

sys.argv[1:1] = ["train"]
main()
