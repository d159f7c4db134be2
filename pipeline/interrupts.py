"""A stopping signal's exception, kept until it surfaces.

Keras 3.15's `pythonify_logs`, run after every batch in the main thread (where it waits for the step's
results), wraps each conversion in a bare `except: pass`: a KeyboardInterrupt, or `pipeline.tracking`'s
Interrupted, raised there by a signal handler is swallowed and training goes on, with the handlers that
ignore a second signal already in place. A handler records its exception here before raising it, and
`pipeline.fitting.fit`'s callback raises it again at once, as it does one swallowed before training began
(tests/test_fault_tolerance.py). Inside `deferred()` (MLflow opening a run) a handler only records it, and the
block's end raises it. No imports of the project: the MLflow side (`pipeline.tracking`) and the GPU check
(`bench.gpu_epoch`, without MLflow) both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

pending: BaseException | None = None
_deferring = 0


def raise_(exc: BaseException):
    """Record `exc` as the pending interrupt and raise it (from a signal handler); inside `deferred()`, only record
    it."""
    global pending
    pending = exc
    if not _deferring:
        raise exc


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a stopping signal must not cut short, raising its exception once the block is done (or has failed).

    `mlflow.start_run` writes the run, then puts it on its list of active runs: an exception raised in between left
    the run RUNNING for good, as nothing ends a run that list does not hold. Once the block is done, the run is open
    and the exception ends it KILLED as usual."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if (exc := take()) is not None:
            raise exc


def keyboard_interrupt(signum, frame):
    """A SIGINT handler: KeyboardInterrupt, as Python's own, but recorded."""
    raise_(KeyboardInterrupt())


def take() -> BaseException | None:
    """The pending interrupt, cleared."""
    global pending
    exc, pending = pending, None
    return exc
