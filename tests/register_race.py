"""What each of two racing registers runs in a process of its own (test_failures.py): a module of its own, light to
import, since a `spawn` process imports the module its target is defined in, and test_failures.py imports Keras."""

from __future__ import annotations

import multiprocessing
import os
import time

import mlflow

from pipeline import config, register
from pipeline.tracking import registry

TINY = "params/tiny.yaml"


def race(uri: str, experiment_id: str, target, registers: list[tuple[str, dict]]) -> list[dict]:
    """Run `target` (one of the functions below) for each (model URI, keyword arguments) of `registers` at once, each
    in a `spawn` process of its own sharing one barrier; the decisions they report, in the order they come. Each
    process must end with exit code 0."""
    spawn = multiprocessing.get_context("spawn")
    barrier, decisions = spawn.Barrier(len(registers)), spawn.Queue()
    procs = [spawn.Process(target=target, args=(uri, experiment_id, model_uri, barrier, decisions), kwargs=kwargs)
             for model_uri, kwargs in registers]
    for proc in procs:
        proc.start()
    results = [decisions.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, results
    return results


def register_after_barrier(uri: str, experiment_id: str, model_uri: str, barrier, decisions, delay: float) -> None:
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
