"""Benchmarks: the sidecar against nginx as a reference mTLS proxy (see README.md here).

Not part of the test suite: nothing here is named ``test_*``; run ``tests/benchmarks/run.sh``.
"""
