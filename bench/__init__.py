"""Benchmarks for avatune: `make bench` (`python -m bench`) and `python -m bench.gpu_train`; see BENCHMARKS.md."""
