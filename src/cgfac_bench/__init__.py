"""Benchmarks behind the ``cgfac-bench`` command: training comparison and layer complexity."""
