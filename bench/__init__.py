"""The convserve benchmark: `python -m bench` (see docs/benchmarks.md).

Not shipped with the package: it measures the service against a plain FastAPI baseline written here
(`bench.baseline`) and against an in-process bound with no HTTP at all (`bench.inprocess`), with
inputs made reproducibly from scikit-image's bundled sample photos (`bench.inputs`).
"""
