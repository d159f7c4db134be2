"""Benchmarks, each run as `python -m bench.<name>` from the project root; results in bench/results/.

Every report states the machine it detected (`bench.machine.machine`); `bench.servers` starts the local
MLflow servers the benchmarks and the tests share.

Importing `pipeline` here, before any benchmark imports Keras, gives every benchmark the pipeline's process settings
(quiet native logs, TensorFlow's pooled CPU allocator, JAX's compilation cache), as `python -m pipeline.<step>` has
them.
"""

import pipeline  # noqa: F401 - for its settings, read once when TensorFlow or JAX loads
