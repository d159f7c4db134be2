"""Benchmarks, each run as `python -m bench.<name>` from the project root; results in bench/results/.

Every report states the machine it detected (`bench.machine.machine`); `bench.servers` starts the local
MLflow servers the benchmarks and the tests share.
"""
