"""ggufkit's tests: a package so that the tests and benchmarks/ import the helpers as tests.helpers."""
