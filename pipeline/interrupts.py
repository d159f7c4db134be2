"""A stopping signal's exception, kept until it surfaces.

Keras 3.15's `pythonify_logs`, run after every batch in the main thread (where it waits for the step's
results), wraps each conversion in a bare `except: pass`: a KeyboardInterrupt, or `pipeline.tracking`'s
Interrupted, raised there by a signal handler is swallowed and training goes on, with the handlers that
ignore a second signal already in place. A handler records its exception here before raising it, and
`pipeline.fitting.fit`'s callback raises it again at once, as it does one swallowed before training began
(tests/test_fault_tolerance.py). No imports: the MLflow side (`pipeline.tracking`) and the GPU check
(`bench.gpu_epoch`, without MLflow) both use it.
"""

from __future__ import annotations

pending: BaseException | None = None


def raise_(exc: BaseException):
    """Record `exc` as the pending interrupt and raise it (from a signal handler)."""
    global pending
    pending = exc
    raise exc


def keyboard_interrupt(signum, frame):
    """A SIGINT handler: KeyboardInterrupt, as Python's own, but recorded."""
    raise_(KeyboardInterrupt())


def take() -> BaseException | None:
    """The pending interrupt, cleared."""
    global pending
    exc, pending = pending, None
    return exc
