"""Benchmarks of ckpt-ledger, each against a baseline measured in the same run (see bench/harness.py)."""
