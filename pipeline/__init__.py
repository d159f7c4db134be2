"""Train, track, evaluate, register and serve a pre-activation ResNet on CIFAR-10 with MLflow.

Importing the package quiets library noise that a person running the pipeline cannot act on, at its
source and before TensorFlow loads; every other warning stays visible:
- TensorFlow's C++ log below ERROR (oneDNN, cpu_feature_guard) and its failed cuInit on machines
  without a GPU driver (`TF_CPP_MIN_LOG_LEVEL`, unless already set);
- the lines TensorFlow's libraries print while `import tensorflow` runs, before its logging is set
  up (absl's "before absl::InitializeLog()" notice, "Could not find cuda drivers"): dropped by
  pattern, any other line of that import is passed through;
- MLflow's per-download progress bars and its "dataset source can be interpreted in multiple ways"
  warning (pipeline.tracking and pipeline.serve quiet the rest of MLflow's advice).

It also makes TensorFlow take CPU memory from its pooling BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC`,
unless already set). With the default allocator every XLA step maps its scratch buffer afresh and the
kernel zeroes ~150 MB of new pages per ResNet-9 training step (38,000 page faults, a quarter of the CPU
time spent in the kernel); pooled, the same step ran 1.39x faster on a 2-core EPYC (`bench.cpu_runtime`).

And it keeps Keras-on-JAX's compiled programs across runs, in `JAX_COMPILATION_CACHE_DIR` (unless already set:
`~/.cache/cifar10-resnet/jax`, under `XDG_CACHE_HOME` where set). A program is looked up by what it computes (the
model, the shapes, the recipe's constants, the devices, JAX's version), so the same command again or a resumed run
loads its train and validation steps instead of compiling them (`fitting.compile_cache`).

First of all, it reads the package's source once (`pipeline.source`): the code this process runs, digests and logs
with its models, whatever happens to the files on disk meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import warnings

from pipeline import source as source  # first: the package's files as this process loads them

# TensorFlow raises its real errors as Python exceptions; its C++ ERROR lines on a CPU-only machine are
# the failed cuInit. A user who wants them sets TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Pooled CPU memory (see above); read once, when TensorFlow makes its first CPU allocator.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# Keras on JAX: compiled XLA programs kept on disk across processes (JAX's persistent compilation cache, read when JAX
# is imported), so a run of a model compiled before starts at once (see above). `JAX_COMPILATION_CACHE_DIR=` (empty)
# turns it off; a folder that cannot be written costs a warning, not the run. Without a home folder (HOME unset and no
# passwd entry, as in some containers) it stays off: `~` unexpanded would have made a folder named `~` where it ran.
_cache_base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
if os.path.isabs(_cache_base):
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache_base, "cifar10-resnet", "jax"))
# Keras builds, saves and loads a functional model by walking its graph recursively, a few Python frames per layer on
# the deepest path: ResNet-1001's ~3,400 layers overflow the default limit of 1,000 (RecursionError in map_graph).
# Python 3.11 keeps pure-Python calls off the C stack, so a higher limit is safe at this depth.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
# A dataset's source is a URL or a file path, which MLflow can also read as a generic URI; either is right.
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways",
                        category=UserWarning)

NATIVE_NOISE = re.compile(rb"All log messages before absl::InitializeLog\(\)|cudart_stub\.cc|cpu_feature_guard\.cc"
                          rb"|^To enable the following instructions|oneDNN custom operations|cuda_platform\.cc")


@contextlib.contextmanager
def native_stderr_without(noise: re.Pattern[bytes]):
    """Collect what native code writes to file descriptor 2 meanwhile; then write it back without the
    lines `noise` matches. (Libraries that log before their logging is configured offer no switch.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not noise.search(line)]
            if kept:
                os.write(2, b"".join(kept))


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        # its work done: no later import of any name asks it (code scoring a served model runs none of this file)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
        with native_stderr_without(NATIVE_NOISE):
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` (whoever asks for it, Keras included) under `native_stderr_without`. It
    stays on `sys.meta_path` until that import: a question that imports nothing (`importlib.util.find_spec(
    "tensorflow")`, asking which backends are installed) must not use it up before."""

    def __init__(self):
        self.finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self.finding:
            return None
        self.finding = True  # the finders after this one answer the question below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _QuietLoader):
            spec.loader = _QuietLoader(spec.loader)
        return spec


if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
