"""Benchmark harness for hub (issue 4): hub against the peers users would otherwise run.

Run ``python -m bench`` (or ``bench/run``) from the repository root; see bench/README.md.
"""
