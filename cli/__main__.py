"""``python -m cli`` runs the ``ckpt-ledger`` command line."""

from cli.main import main

main()
