"""Peer-vs-us benchmarks, run from the repository root as `python -m benchmarks.bench_<name>`; never
imported by the package."""
