"""Run every registered benchmark: ``python bench/run.py [--quick] [--only NAME] [--out FILE]``.

Benchmarks are discovered from the modules of ``bench/`` (see ``bench/harness.py``);
the table goes to stdout, progress to stderr, records to ``bench/out/results.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
    from bench import harness

    sys.exit(harness.main())
