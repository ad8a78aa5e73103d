"""The ``ckpt-ledger`` command line: a click group over the ledger's Python API."""
