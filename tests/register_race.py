"""What each of two racing registers runs in a process of its own (test_failures.py): a module of its own, light to
import, since a `spawn` process imports the module its target is defined in, and test_failures.py imports Keras."""

from __future__ import annotations

import os
import time

import mlflow

from pipeline import config, register
from pipeline.tracking import registry

TINY = "params/tiny.yaml"


def register_after_barrier(uri: str, experiment_id: str, model_uri: str, barrier, delay: float, decisions) -> None:
    """Register `model_uri` in a process of its own; read the champion, wait for the other register to have
    read it too, sleep `delay`, then go on."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    read = registry.current_champion
    first = [True]

    def read_then_wait(name, alias):
        champion = read(name, alias)
        if first:
            first.clear()
            barrier.wait(timeout=120)
            time.sleep(delay)
        return champion

    registry.current_champion = read_then_wait
    with mlflow.start_run(experiment_id=experiment_id):
        decisions.put(register.run(config.load(TINY), model_uri))


def register_at_once(uri: str, experiment_id: str, model_uri: str, barrier, decisions) -> None:
    """Register `model_uri` in a process of its own; wait for the other register to be about to register it too
    (each has found no version of it), then go on."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    create = registry.register_version

    def create_after_barrier(*args, **kwargs):
        barrier.wait(timeout=120)
        return create(*args, **kwargs)

    registry.register_version = create_after_barrier
    with mlflow.start_run(experiment_id=experiment_id):
        decisions.put(register.run(config.load(TINY), model_uri))
