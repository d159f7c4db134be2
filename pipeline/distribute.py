"""Data parallelism with the backend's own engine: one device, several local devices, or several hosts.

train.distribute:
- none: the first GPU, else the CPU.
- mirrored: `tf.distribute.MirroredStrategy` over every local GPU (else every logical CPU device).
- data_parallel: `keras.distribution.DataParallel` (JAX) over every local GPU (else every XLA host device).
- multi_worker: `tf.distribute.MultiWorkerMirroredStrategy` over every host in `TF_CONFIG`.
- auto: multi_worker if `TF_CONFIG` names several tasks, else mirrored / data_parallel if there
  are several GPUs, else none.

Multi-worker training runs the same command on every host, each with its own `TF_CONFIG`.
Only the chief (task `chief`, else `worker` 0) talks to MLflow; the other workers train in
lock step without logging anything (see the README's "Several hosts").
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import ConfigError

if TYPE_CHECKING:
    import keras

TF_CONFIG = "TF_CONFIG"


@dataclass
class Distribution:
    """How this process trains: the scope to build and compile the model in, the devices used.

    cluster: this host's place in a multi-worker cluster, None when training alone.
    """

    mode: str
    devices: list[str]
    strategy: object | None = None
    cluster: Cluster | None = None

    @property
    def chief(self) -> bool:
        """Whether this process logs to MLflow."""
        return self.cluster is None or self.cluster.chief

    @property
    def task(self) -> str:
        return self.cluster.task if self.cluster else ""

    @property
    def workers(self) -> int:
        return self.cluster.workers if self.cluster else 1

    def scope(self) -> contextlib.AbstractContextManager:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def agree(self, job: str, done: int) -> None:
        """In a cluster, check before any step that every host trains the same job from the same epoch.

        job: a digest of what every host must share (`train.training_job`: the model and train params and the
        data); done: the epochs this host's checkpoint holds, which it restores. Hosts that differ
        in either would train different models or unequal numbers of steps: the chief would log and register
        a model no single recipe produced, or one host would wait on a collective nobody joins. Every host
        gathers every host's job and epoch (one collective, so all reach the same verdict) and each raises
        the same ConfigError on a mismatch. For multi_worker only (`cluster` set)."""
        import tensorflow as tf

        tasks = self.cluster.tasks
        mine = [tasks.index(self.cluster.task), done, int(job[:7], 16), int(job[7:14], 16)]
        everyone = self.strategy.gather(self.strategy.run(lambda: tf.constant([mine], tf.int32)), axis=0)
        hosts = {tasks[task]: (done, digest) for task, done, *digest in everyone.numpy().tolist()}
        chief = tasks[0]  # the chief task, else worker 0
        differ = [task for task, (_, digest) in hosts.items() if digest != hosts[chief][1]]
        if differ:
            raise ConfigError(f"{TF_CONFIG}: {', '.join(differ)} started with other model or train params, or other "
                              f"data, than the chief ({chief}): start every host with the same params, epochs, "
                              f"overrides and data")
        if len({done for done, _ in hosts.values()}) > 1:
            held = ", ".join(f"{task} {done}" for task, (done, _) in hosts.items())
            raise ConfigError(f"resume: the hosts' checkpoints hold different completed epochs ({held}): they "
                              f"must continue from the same one. Start afresh: rerun every host with resume=never "
                              f"(`-P resume=never` on the chief, `--resume never` on the others)")

    def adapt(self, model: keras.Model) -> None:
        """Make `model.fit` work under this distribution (a no-op except for multi_worker)."""
        if self.mode == "multi_worker":
            _multi_worker_fit_fixes(model, self.strategy)


@dataclass(frozen=True)
class Cluster:
    """This host's place in the `TF_CONFIG` cluster."""

    spec: dict
    task_type: str
    index: int

    @property
    def workers(self) -> int:
        return sum(len(self.spec[name]) for name in ("chief", "worker") if name in self.spec)

    @property
    def chief(self) -> bool:
        """The chief task, else worker 0, is the one that logs."""
        return self.task_type == "chief" or ("chief" not in self.spec and self.task_type == "worker"
                                             and self.index == 0)

    @property
    def task(self) -> str:
        return f"{self.task_type} {self.index}"

    @property
    def tasks(self) -> list[str]:
        """Every training task, chief first (so the one that logs first): the order of TensorFlow's replicas."""
        return [f"{name} {i}" for name in ("chief", "worker") for i in range(len(self.spec.get(name, ())))]


def cluster_from_env() -> Cluster | None:
    """This host's place in the cluster TF_CONFIG describes; None if it is unset or names one task.

    A non-chief task must not be started by `mlflow run`, which would open a run nobody logs to.
    """
    raw = os.environ.get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        cluster = Cluster(spec["cluster"], spec["task"]["type"], int(spec["task"]["index"]))
        ok = cluster.task_type in ("chief", "worker") and 0 <= cluster.index < len(cluster.spec[cluster.task_type])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{TF_CONFIG}: not a cluster spec like "
                          '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                          f'"index": 0}} ({exc.__class__.__name__}: {exc})') from None
    if not ok:
        raise ConfigError(f"{TF_CONFIG}: task {spec['task']!r} is not a chief or worker listed in the cluster")
    if cluster.workers < 2:
        return None
    if not cluster.chief and os.environ.get("MLFLOW_RUN_ID"):
        raise ConfigError(f"{TF_CONFIG}: this host is {cluster.task}, which logs nothing: start it with "
                          f"`python -m pipeline.train` and the chief's params, not with `mlflow run`")
    return cluster


def distribution(mode: str) -> Distribution:
    """Set up `mode` (see the module table). Call before the first TensorFlow op: a multi-worker
    strategy must exist before any op runs, and its creation waits for every host to connect."""
    import keras

    backend = keras.backend.backend()
    cluster = cluster_from_env() if backend == "tensorflow" else None
    if mode == "multi_worker" or (mode == "auto" and cluster):  # before anything initialises TensorFlow
        if backend != "tensorflow":
            raise ConfigError(f"train.distribute: 'multi_worker' needs the TensorFlow backend, not {backend}")
        if not cluster:
            raise ConfigError(f"train.distribute: 'multi_worker' needs {TF_CONFIG} naming at least two tasks "
                              f"(see the README's 'Several hosts')")
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # blocks until every task has connected
        return Distribution("multi_worker", list(strategy.extended.worker_devices), strategy, cluster)
    devices = keras.distribution.list_devices()
    gpus = [d for d in devices if d.split(":")[0].lower() in ("gpu", "cuda")]
    if mode == "auto":
        mode = ("mirrored" if backend == "tensorflow" else "data_parallel") if len(gpus) > 1 else "none"
    if mode == "mirrored" and backend != "tensorflow":
        raise ConfigError(f"train.distribute: 'mirrored' needs the TensorFlow backend, not {backend}")
    if mode == "data_parallel" and backend != "jax":
        raise ConfigError(f"train.distribute: 'data_parallel' needs the JAX backend, not {backend}")
    if mode == "mirrored":
        import tensorflow as tf

        names = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        return Distribution(mode, names, tf.distribute.MirroredStrategy(devices=names))
    if mode == "data_parallel":
        replicas = gpus or devices
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=replicas))
        return Distribution(mode, replicas)
    return Distribution(mode, (gpus or devices)[:1])


def _multi_worker_fit_fixes(model: keras.Model, strategy) -> None:
    """Two gaps in Keras 3's TensorFlow trainer under MultiWorkerMirroredStrategy, bridged here.

    1. `fit` builds the model from its first batch by all-reducing the batch *structure* across
       workers, which TensorFlow refuses; the local replica's batch carries the same shapes.
    2. Each step's logs are mean-reduced across workers along axis 0, which scalars lack. The
       logged values come from metric variables that are already summed across all replicas of all
       workers, so every replica holds the global value: take the local one.
    Both are checked by tests/test_fast_path.py, which trains over two local worker processes.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = symbolic_build
    if getattr(tf_trainer.reduce_per_replica, "multi_worker_fix", False):
        return
    reduce_per_replica = tf_trainer.reduce_per_replica

    def reduce_local_first(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0] if tf_trainer._is_per_replica_instance(v) else v,
                values)
        return reduce_per_replica(values, strategy, reduction)

    reduce_local_first.multi_worker_fix = True
    tf_trainer.reduce_per_replica = reduce_local_first
