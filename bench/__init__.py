"""ModelForge benchmarks: `make bench` (python -m bench) starts the suite, measures and writes docs/PERFORMANCE.md."""
