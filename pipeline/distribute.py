"""Data parallelism with the backend's own engine: one device, several local devices, or several hosts.

train.distribute:
- none: the first GPU, else the CPU.
- mirrored: `tf.distribute.MirroredStrategy` over every local GPU (else every logical CPU device).
- data_parallel: `keras.distribution.DataParallel` (JAX) over every local GPU (else every XLA host device).
- multi_worker: `tf.distribute.MultiWorkerMirroredStrategy` over every host in `TF_CONFIG`.
- auto: multi_worker if `TF_CONFIG` names several tasks, else mirrored / data_parallel if there
  are several GPUs, else none.

Multi-worker training runs the same command on every host, each with its own `TF_CONFIG`; with a
`TF_CONFIG` naming several tasks, only auto and multi_worker are accepted, on TensorFlow only.
Only the chief (task `chief`, else `worker` 0) talks to MLflow; the other workers train in
lock step without logging anything (see docs/several-hosts.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError

# The names of this host's loopback interface: one host however spelled (TF_CONFIG's addresses, tracking URIs)
LOOPBACK = ("localhost", "127.0.0.1", "::1")

if TYPE_CHECKING:
    import keras

TF_CONFIG = "TF_CONFIG"
TRAINED = -1  # `Distribution.agree`'s epochs of a chief that goes on from a model trained before: nothing to train
# `Distribution.agree`'s codes of a (dtype policy, jit_compile) choice: an index into each
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE = (False, True, "auto")


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

    @property
    def replicas(self) -> int:
        """The model's copies that each take a slice of every global batch: of all hosts for multi_worker."""
        if self.strategy is not None:
            return int(self.strategy.num_replicas_in_sync)
        return len(self.devices) if self.mode == "data_parallel" else 1

    def check_batches(self, batch_size: int, drop_remainder: bool, ghost_batch: int, train_images: int | None,
                      val_images: int | None = 0) -> None:
        """ConfigError, before any run trains, for a global batch these replicas cannot share. An image count of None
        (not known yet: a data path not read yet) leaves out the checks of that split's last batch.

        Each global batch is split over the replicas. A replica whose slice is empty (a batch, or the epoch's
        partial last batch, smaller than the replicas) normalises nothing: BatchNormalization's batch mean
        over no image is NaN, which reaches the moving statistics; val_loss goes NaN after the first epoch and
        the run stops as 'diverged' (on TensorFlow's CPU devices, oneDNN's conv on an empty batch fails first).
        Ghost batch norm cuts each replica's slice, not the global batch, into ghost batches.
        JAX's DataParallel shards every batch evenly over its devices: a batch, the epoch's partial last batch or
        validation's last batch that is no multiple of the devices fails inside `fit` (jax's IndivisibleError)."""
        replicas = self.replicas
        if replicas < 2:
            return
        where = f"{replicas} replicas ({self.mode} over {', '.join(self.devices)}" + \
            (f", {self.workers} hosts)" if self.cluster else ")")
        if self.strategy is None:  # JAX's DataParallel
            self._check_even_batches(batch_size, drop_remainder, train_images, val_images, where)
            return
        if batch_size < replicas:
            raise ConfigError(f"train.batch_size: {batch_size} is split over {where}: some would train on empty "
                              f"slices; use a batch of at least {replicas}")
        if ghost_batch and batch_size % (replicas * ghost_batch):
            raise ConfigError(f"model.ghost_batch: each of the {where} normalises its slice of "
                              f"train.batch_size {batch_size} in ghost batches of {ghost_batch}: the batch must be a "
                              f"multiple of {replicas} x {ghost_batch} = {replicas * ghost_batch}")
        last = 0 if drop_remainder or train_images is None else train_images % batch_size
        if 0 < last < replicas:
            raise ConfigError(f"train.batch_size: each epoch ends with a batch of {last} of the {train_images} "
                              f"training images, split over {where}: a replica would train on an empty slice, whose "
                              f"BatchNormalization statistics are NaN. Set train.drop_remainder=true, or a batch "
                              f"size that leaves at least {replicas} images or none")
        cpu = any("cpu" in d.lower() for d in self.devices)
        if cpu and val_images is not None and 0 < val_images % batch_size < replicas:
            raise ConfigError(f"train.batch_size: validation ends with a batch of {val_images % batch_size} of "
                              f"the {val_images} images, split over {where}: TensorFlow's CPU convolution fails "
                              f"on a replica's empty slice. Use a batch size that leaves at least {replicas} "
                              f"validation images or none")

    def _check_even_batches(self, batch_size: int, drop_remainder: bool, train_images: int | None,
                            val_images: int | None, where: str) -> None:
        """ConfigError for a batch keras.distribution.DataParallel cannot shard evenly over its devices."""
        replicas = self.replicas
        even = f"which keras.distribution.DataParallel cannot split evenly over {where}"
        if batch_size % replicas:
            raise ConfigError(f"train.batch_size: {batch_size}, {even}: use a multiple of {replicas}")
        last = 0 if drop_remainder or train_images is None else train_images % batch_size
        if last % replicas:
            raise ConfigError(f"train.batch_size: each epoch ends with a batch of {last} of the {train_images} "
                              f"training images, {even}. Set train.drop_remainder=true, or a batch size that leaves "
                              f"a multiple of {replicas} images")
        if val_images is not None and val_images % batch_size % replicas:
            raise ConfigError(f"train.batch_size: validation ends with a batch of {val_images % batch_size} of the "
                              f"{val_images} images, {even}. Use a batch size that leaves a multiple of {replicas} "
                              f"validation images")

    def scope(self) -> contextlib.AbstractContextManager:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def end(self) -> None:
        """Training is over: what the process builds and runs next (the served copy and its input example, evaluate in
        `main`, a sweep's next trial) runs on one device. JAX's DataParallel is Keras's process-wide distribution: left
        in place, every later model was sharded over the devices, and a batch no multiple of them (the served model's
        power-of-two batches on 3 GPUs) failed with jax's IndivisibleError; a later `none` trained data-parallel."""
        if self.mode == "data_parallel":
            import keras

            keras.distribution.set_distribution(None)

    @contextlib.contextmanager
    def telling_the_others(self):
        """Around a worker's part of training: an error of its own (its data unreadable, its model refused, a failed
        checkpoint, Ctrl-C) is reported to the cluster's coordination service, which aborts the other hosts'
        collectives at once. They learned of a worker that ended only from its missing heartbeats,
        $PIPELINE_HEARTBEAT_TIMEOUT s later (the chief leads the service: its ending is known at once). A host lost
        (`host_lost`), which the cluster knows already, is not reported. A no-op when training alone."""
        try:
            yield
        except BaseException as exc:
            if self.cluster is not None and not getattr(exc, "host_lost", False) and not (
                    isinstance(exc, SystemExit) and exc.code in (0, None)):
                _report_to_cluster(self.cluster, exc)
            raise

    def agree(self, job: dict[str, str], done: int, fast_path: tuple[str, bool | str] = ("float32", False),
              run: int = 0) -> tuple[int, tuple[str, bool | str], int]:
        """In a cluster, check before the model is built that every host trains the same job from the same epoch of
        the same run; return the chief's `done`, `fast_path` and `run`, which every host trains with.

        job: hex digests of what every host must share, by what they digest (`train.training_job`: the model and
        train params, the data, the code); done: the epochs this host's checkpoint holds, which it restores, or on the
        chief `TRAINED`: it trains nothing (its model was trained before), and the others stop too. Hosts
        that differ in either would train different models or unequal numbers of steps: the chief would log and
        register a model no single recipe produced, or one host would wait on a collective nobody joins. Building
        the model is such a collective (each variable's initial value is broadcast from the chief): hosts building
        models of other shapes failed there, each with TensorFlow's traceback. Every host gathers every host's job
        and epoch (one collective, so all reach the same verdict) and each raises the same ConfigError on a
        mismatch. A host lost here, or after it before training began (`before_training`), is said to have ended
        before training began. For multi_worker only (`cluster` set).

        fast_path: the (dtype policy, jit_compile) this host would train with (`fitting.planned_fast_path`: the
        params' `auto` resolved here, or a resumed chief's as its run recorded). `train.precision: auto` resolves
        per machine (bfloat16 on GPUs and CPUs with bf16 units, else float32), so hosts of different kinds, or a
        cluster resumed on other hosts than it trained on, would train in different precisions: every host takes
        the chief's, the one its run logs and records.

        run: the chief's train run (`run_key`); on another host, the chief's run its checkpoint recorded (0: none, or
        recorded by no earlier version). A worker's checkpoint is keyed by params and data, not by run: run A killed
        at epoch 2, run B of the same params killed at epoch 2 too, then A resumed, and the hosts went on from
        different weights (the chief's A's, a worker's B's), each applying the summed gradients to its own."""
        import tensorflow as tf

        tasks, parts = self.cluster.tasks, list(job)
        # Two 28-bit pieces of each digest (int32 tensors).
        mine = [tasks.index(self.cluster.task), done, PRECISIONS.index(fast_path[0]), JIT_COMPILE.index(fast_path[1]),
                run, *(int(job[part][i:i + 7], 16) for part in parts for i in (0, 7))]
        with self.before_training():  # a host that failed in prepare ends here
            everyone = self.strategy.gather(self.strategy.run(lambda: tf.constant([mine], tf.int32)), axis=0)
        return agreement(tasks, parts, everyone.numpy().tolist())

    def before_training(self) -> contextlib.AbstractContextManager:
        """Around what a host of a cluster does from `agree` until `fit`'s first step (building the model, whose
        variables' initial values are broadcast from the chief): a host lost there (failed with an error of its own,
        killed) ended before training began, which `host_lost_as_step_failure` says in one line on the others.
        A no-op when training alone."""
        if self.cluster is None:
            return contextlib.nullcontext()
        return host_lost_as_step_failure(self.task, before=self.cluster.tasks[0])

    def adapt(self, model: keras.Model) -> None:
        """Make `model.fit` work under this distribution (a no-op except for multi_worker)."""
        if self.mode == "multi_worker":
            _multi_worker_fit_fixes(model, self.strategy)
            _host_lost_as_step_failure(model, self.task, self.cluster.tasks[0])


def run_key(run_id: str) -> int:
    """A train run's id as `Distribution.agree` sends it: 28 bits of its digest (an int32 tensor), never 0 (no run)."""
    return (int(hashlib.sha256(run_id.encode()).hexdigest()[:7], 16) or 1) if run_id else 0


def agreement(tasks: list[str], parts: list[str], rows: list[list[int]]) -> tuple[int, tuple[str, bool | str], int]:
    """`Distribution.agree`'s verdict on every host's row (task index, done, fast path codes, run, digest pieces), the
    same on every host: the chief's done, fast path and run, or the ConfigError every host raises."""
    hosts = {tasks[task]: (done, (PRECISIONS[precision], JIT_COMPILE[jit]),
                           dict(zip(parts, zip(d[::2], d[1::2], strict=True), strict=True)))
             for task, done, precision, jit, _, *d in rows}
    runs = {tasks[row[0]]: row[4] for row in rows}
    chief = tasks[0]  # the chief task, else worker 0
    differ = {task: [part for part in parts if digests[part] != hosts[chief][2][part]]
              for task, (_, _, digests) in hosts.items()}
    if any(differ.values()):
        what = "; ".join(f"{task} started with other {' and other '.join(differs)}"
                         for task, differs in differ.items() if differs)
        raise ConfigError(f"{TF_CONFIG}: {what} than the chief ({chief}): start every host with the same code, "
                          f"params, epochs, overrides and data")
    done, fast_path, _ = hosts[chief]
    if done != TRAINED:
        check_checkpoints(chief, {task: (held, runs[task]) for task, (held, _, _) in hosts.items()})
    return done, fast_path, runs[chief]


def check_checkpoints(chief: str, held: dict[str, tuple[int, int]]) -> None:
    """ConfigError where the hosts' checkpoints cannot go on together. held: by task (`tasks`' order), the epochs its
    checkpoint holds and the chief's run they belong to (`run_key`; 0 where none is recorded; the chief's own run on
    the chief): every host must hold as many, and a host holding any must hold the chief's run's (a worker's
    checkpoint is keyed by params and data, so another run of the same params overwrote it)."""
    run = held[chief][1]
    if len({epochs for epochs, _ in held.values()}) > 1:
        listed = ", ".join(f"{task} {epochs}" for task, (epochs, _) in held.items())
        raise ConfigError(f"resume: the hosts' checkpoints hold different completed epochs ({listed}): they "
                          f"must continue from the same one. Start afresh: rerun every host with resume=never "
                          f"(`-P resume=never` on the chief, `--resume never` on the others)")
    others = [task for task, (epochs, theirs) in held.items() if epochs > 0 and theirs not in (0, run)]
    if others:
        listed = ", ".join(f"{task}'s checkpoint holds {held[task][0]} epochs" for task in others)
        raise ConfigError(f"resume: {listed} of another run than the chief's ({chief}): the hosts would train on from "
                          f"different weights. Start afresh: rerun every host with resume=never (`-P resume=never` on "
                          f"the chief, `--resume never` on the others)")


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

    @property
    def addresses(self) -> dict[str, str]:
        """Every training task's 'host:port', by task (`tasks`' order)."""
        return {f"{name} {i}": address for name in ("chief", "worker")
                for i, address in enumerate(self.spec.get(name, ()))}


def cluster_from_env(*, any_task: bool = False) -> Cluster | None:
    """This host's place in the cluster TF_CONFIG describes; None if it is unset, names no cluster ('{}') or one task.

    A non-chief task must not be started by `mlflow run`, which would open a run nobody logs to (`any_task`: whatever
    this task is, for a command that checks it runs on no cluster).
    """
    raw = os.environ.get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        try:
            spec = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(spec, dict):
            kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(spec), "a number")
            raise TypeError(f"a JSON object is needed, got {kind}")
        if spec.get("cluster", {}) == {}:  # '{}': no cluster, as TensorFlow reads it
            return None
        task = spec.get("task")
        if "task" not in spec:
            raise ValueError("no 'task': this host's place in the cluster")
        if not isinstance(task, dict):
            raise TypeError(f'\'task\' must be an object like {{"type": "worker", "index": 0}}, got {task!r}')
        for key in ("type", "index"):
            if key not in task:
                raise ValueError(f"'task' has no {key!r}")
        cluster = Cluster(spec["cluster"], task["type"], _task_index(task["index"]))
        if not isinstance(cluster.spec, dict):
            raise TypeError(f"'cluster' must map task types to addresses, got {cluster.spec!r}")
        others = sorted(set(cluster.spec) - {"chief", "worker"})
        if others:  # a 'ps' listed but never started: TensorFlow's collective setup waited for it forever
            raise ValueError(f"only 'chief' and 'worker' tasks train here, got {', '.join(map(repr, others))}")
        for name in ("chief", "worker"):  # else TensorFlow's traceback, or a string's letters counted as hosts
            hosts = cluster.spec.get(name, [])
            if not (isinstance(hosts, list) and all(isinstance(h, str) and h for h in hosts)):
                raise TypeError(f"{name!r} must be a list of 'host:port' strings, got {hosts!r}")
            for address in hosts:  # else an OverflowError's traceback, or a wait for a port that cannot answer
                host, _, port = address.rpartition(":")
                if not (HOST.fullmatch(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
                    raise ValueError(f"{address!r} is not a 'host:port' address with a port in 1-65535 (an IPv6 host "
                                     f"in brackets: [::1]:12345)")
        addresses = [*cluster.spec.get("chief", []), *cluster.spec.get("worker", [])]
        spelled = {}  # one address however spelled: `localhost:1`, `LocalHost:1`, `127.0.0.1:1` and `[::1]:1`
        for address in addresses:
            spelled.setdefault(_address_key(address), []).append(address)
        twice = [" = ".join(dict.fromkeys(names)) for names in spelled.values() if len(names) > 1]
        if twice:  # else two tasks on one port: TensorFlow waits forever, deaf to Ctrl-C
            raise ValueError(f"every task needs an address of its own, got {', '.join(twice)} more than once")
        if cluster.spec.get("chief") == []:  # else no host logs: worker 0 is no chief beside a 'chief' job
            raise ValueError("'chief' lists no address: leave it out (worker 0 then logs), or give the chief's")
        if len(cluster.spec.get("chief", [])) > 1:
            raise ValueError(f"at most one 'chief' (the host that logs), got {cluster.spec['chief']!r}")
        listed = cluster.spec.get(cluster.task_type, [])
        ok = cluster.task_type in ("chief", "worker") and 0 <= cluster.index < len(listed)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{TF_CONFIG}: not a cluster spec like "
                          '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                          f'"index": 0}} ({"no " * isinstance(exc, KeyError)}{exc})') from None
    if not ok:
        listed = " and ".join(", ".join(cluster.tasks).rsplit(", ", 1)) or "no task"
        raise ConfigError(f"{TF_CONFIG}: this host's task, {cluster.task}, is not in the cluster, which lists "
                          f"{listed}: give this host its own task there")
    if cluster.workers < 2:
        return None
    if not cluster.chief and os.environ.get("MLFLOW_RUN_ID") and not any_task:
        raise ConfigError(f"{TF_CONFIG}: this host is {cluster.task}, which logs nothing: start it with "
                          f"`python -m pipeline.train` and the chief's params, not with `mlflow run`")
    return cluster


# A host TensorFlow's gRPC reaches: a name or an IPv4 address, or an IPv6 address in brackets. Else ('http://host-a',
# ' host-a', '::1' bare) no host reached it: each waited $PIPELINE_HOSTS_TIMEOUT, then said it "did not start"
HOST = re.compile(r"[\w.-]+|\[[0-9A-Fa-f:.]+(%\w+)?\]")


def _address_key(address: str) -> tuple[str, str]:
    """One 'host:port' however spelled (`localhost:1`, `LocalHost:1`, `127.0.0.1:1`, `[::1]:1`, `localhost:01`)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]").lower()
    return "localhost" if host in LOOPBACK else host, str(int(port)) if port.isascii() and port.isdigit() else port


def _task_index(value) -> int:
    """TF_CONFIG's task index: an integer (TensorFlow reads "1" as 1 too; 0.5 or true are no task's index)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not (str(value).strip().isascii()
                                                                            and str(value).strip().isdigit()):
        raise ValueError(f"the task index must be 0, 1, ..., got {value!r}")
    return int(value)


def check_mode(mode: str, backend: str, cluster: Cluster | None) -> None:
    """ConfigError for a `train.distribute` mode that `backend` and the cluster (TF_CONFIG's, or None) cannot train
    in: what `distribution` refuses, checked without setting anything up (a sweep checks each trial's here)."""
    if cluster and mode not in ("auto", "multi_worker"):  # else the chief trains alone, the workers are refused
        raise ConfigError(f"train.distribute: {mode!r} trains on one host, but {TF_CONFIG} names {cluster.workers} "
                          f"hosts: use auto or multi_worker (every GPU of every host), or unset {TF_CONFIG} to train "
                          f"on this host alone")
    if mode == "multi_worker" or (mode == "auto" and cluster):
        if backend != "tensorflow":  # else each host would train alone, or a worker be told to run what it runs
            raise ConfigError(f"train.distribute: {mode!r}"
                              + (f" with {TF_CONFIG} naming {cluster.workers} hosts" if cluster else "")
                              + f": training over several hosts ('multi_worker') needs the TensorFlow backend, not "
                              f"{backend}: set KERAS_BACKEND=tensorflow"
                              + (f", or unset {TF_CONFIG} to train on this host alone" if cluster else ""))
        if not cluster:
            raise ConfigError(f"train.distribute: 'multi_worker' needs {TF_CONFIG} naming at least two tasks "
                              f"(see docs/several-hosts.md)")
    if mode == "mirrored" and backend != "tensorflow":
        raise ConfigError(f"train.distribute: 'mirrored' needs the TensorFlow backend, not {backend}")
    if mode == "data_parallel" and backend != "jax":
        raise ConfigError(f"train.distribute: 'data_parallel' needs the JAX backend, not {backend}")


# One MirroredStrategy per set of devices for the life of the process, whatever trains under it. Each new one numbers
# its collective ops (the gradients' all-reduce) from the same keys as the last: the second training of another model
# in one process (a sweep's next trial, a model of other widths) met the first's op under its key and ended at its
# first step ("Shape mismatch in the collective instance ...: expected shape [352] ... [8946]").
_MIRRORED: dict[tuple[str, ...], Any] = {}


def distribution(mode: str, job: dict[str, str] | None = None, checkpoint: tuple[int, int] | None = None
                 ) -> Distribution:
    """Set up `mode` (see the module table). Call before the first TensorFlow op: a multi-worker
    strategy must exist before any op runs, and its creation waits for every host to connect.
    job: in a cluster, the digests of what every host must share that are known before any run opens
    (`train.meeting_job`), compared as the hosts meet (`wait_for_hosts`); checkpoint: the epochs this host's checkpoint
    holds and the chief's run they belong to, where known before any run opens (`train.chief_checkpoint`,
    `train.worker_checkpoint`), compared there too (`check_checkpoints`)."""
    import keras

    backend = keras.backend.backend()
    cluster = cluster_from_env()
    check_mode(mode, backend, cluster)
    if mode == "multi_worker" or (mode == "auto" and cluster):  # before anything initialises TensorFlow
        import tensorflow as tf

        # TensorFlow's wait below cannot be interrupted: it starts once all are up
        heartbeat = heartbeat_timeout()
        wait_for_hosts(cluster, job=job, checkpoint=checkpoint)
        _configure_coordination(cluster, heartbeat)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # blocks until every task has connected
        return Distribution("multi_worker", list(strategy.extended.worker_devices), strategy, cluster)
    devices = keras.distribution.list_devices()
    gpus = [d for d in devices if d.split(":")[0].lower() in ("gpu", "cuda")]
    if mode == "auto":
        mode = ("mirrored" if backend == "tensorflow" else "data_parallel") if len(gpus) > 1 else "none"
    if mode == "mirrored":
        import tensorflow as tf

        names = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        if (strategy := _MIRRORED.get(tuple(names))) is None:
            strategy = _MIRRORED[tuple(names)] = tf.distribute.MirroredStrategy(devices=names)
        one_device_note(mode, names)
        return Distribution(mode, names, strategy)
    if mode == "data_parallel":
        replicas = gpus or devices
        one_device_note(mode, replicas)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=replicas))
        return Distribution(mode, replicas)
    keras.distribution.set_distribution(None)  # an earlier training's data_parallel in this process (a sweep's trial)
    return Distribution(mode, (gpus or devices)[:1])


def one_device_note(mode: str, devices: list[str]) -> None:
    """A warning where `mode`, asked for by name, has one device to spread over: it trains as 'none' does, and
    mirrored's strategy also turns jit_compile auto's XLA off (Keras's rule), which 'none' keeps."""
    if len(devices) != 1:
        return
    cost = " but without XLA under train.jit_compile auto (Keras turns it off under a strategy)" * (mode == "mirrored")
    print(f"warning: train.distribute {mode!r} over one device ({devices[0]}) trains as 'none' does{cost}: "
          f"give 'auto' or 'none' on a machine of one device", file=sys.stderr, flush=True)


HOSTS_TIMEOUT = "PIPELINE_HOSTS_TIMEOUT"  # seconds a host waits for the cluster's other hosts to start


def hosts_timeout() -> float:
    return _seconds(HOSTS_TIMEOUT, "600", "the seconds a host waits for the others to start")


# Seconds without a host's heartbeat after which the cluster takes it for lost and aborts every collective.
# TensorFlow's 10 s took a live chief for lost on a busy 2-core machine (its own heartbeat, in its own process, came
# late); a host killed is found at once anyway (its connections close), so the wait matters only for one that hangs.
HEARTBEAT_TIMEOUT = "PIPELINE_HEARTBEAT_TIMEOUT"


def heartbeat_timeout() -> float:
    return _seconds(HEARTBEAT_TIMEOUT, "60", "the seconds without a host's heartbeat before the others take it for "
                    "lost")


def _seconds(variable: str, default: str, meaning: str) -> float:
    raw = os.environ.get(variable) or default  # set empty: unset, as a shell's VAR= is
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0
    if not 0 < seconds < 1e9:
        raise ConfigError(f"{variable}: {meaning}, a positive number, got {raw!r}")
    return seconds


def _configure_coordination(cluster: Cluster, seconds: float) -> None:
    """TensorFlow's coordination service as MultiWorkerMirroredStrategy configures it (standalone, led by the
    chief, over the chief and worker jobs), with heartbeats timing out after `seconds` instead of its fixed 10 s:
    the strategy keeps a configuration it finds. Before the strategy exists."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    leader = "chief" if "chief" in cluster.spec else "worker"
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        heartbeat_timeout_in_ms=max(1, round(seconds * 1000)),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster.spec[job]))
                          for job in ("chief", "worker") if job in cluster.spec])


HELLO = b"pipeline.distribute "  # what `wait_for_hosts`' listener answers first, then its `hello`'s JSON and a newline
# What a host's probe sends back once it has read a peer's whole hello, then its own wait's token (`me`) and a
# newline: a host that refuses that peer answers on until then, however long the peer is stopped or starved of CPU (a
# fixed 3 s missed a peer stopped for longer, which then found nothing at this port and waited out
# $PIPELINE_HOSTS_TIMEOUT)
HEARD = HELLO + b"heard "
MOMENT = 3  # seconds of a wait that any start may take, before it is said


def hello(cluster: Cluster, waiting: dict[str, list[str]] | None = None, job: dict[str, str] | None = None,
          me: str = "", checkpoint: tuple[int, int] | None = None) -> bytes:
    """What this host's port answers while it waits for the others (`wait_for_hosts`): its task and cluster, the
    hosts it has not reached yet (by task: [the address it tried, why it failed]), none once it has reached them all,
    the digests of its `job`, `me`, a token of this wait alone (a peer's address that reaches this host itself), and
    its `checkpoint` ([epochs, the chief's run], where known)."""
    return HELLO + json.dumps({"task": cluster.task, "cluster": cluster.spec, "waiting": waiting or {},
                               "job": job or {}, "me": me,
                               **({"checkpoint": list(checkpoint)} if checkpoint is not None else {})}).encode() + b"\n"


def wait_for_hosts(cluster: Cluster, timeout: float | None = None, job: dict[str, str] | None = None,
                   checkpoint: tuple[int, int] | None = None) -> None:
    """Wait until every host of `cluster` has reached every other on its TF_CONFIG port, at most `timeout` s
    ($PIPELINE_HOSTS_TIMEOUT, default 600): then a ConfigError names the hosts that did not come, or a host that did
    not reach another.

    TensorFlow's collective setup (`MultiWorkerMirroredStrategy()`) waits for every host in C++ holding the GIL,
    where no Python signal handler, thread or timeout runs: a host whose peers never came ignored Ctrl-C for good.
    This wait is Python's, so Ctrl-C ends it. Meanwhile this host's own port answers (a plain listener, closed
    before TensorFlow binds the port) with its task and cluster (`hello`), so hosts started in any order find each
    other; a peer's TensorFlow that reaches the listener is turned away and retries (about once a second) until
    TensorFlow answers there. A peer that answers with another cluster, or as another task than the one at its
    address, is a ConfigError on every host that hears it (`_check_peer`): that host would wait in TensorFlow for
    tasks that never come, for good. The hello also says which hosts this one has not reached yet, and no host goes
    on while a peer still waits for one: a third host's name misspelt in one host's TF_CONFIG (the same port, so the
    clusters compare alike) left the hosts that reached everyone in TensorFlow's wait for the one that never came.
    A peer's silence for a fixed time decides nothing (it may be stopped or starved of CPU a while): a port that says
    nothing is probed again (`_probe`), and a host that refuses a peer answers on until that peer's probe says it
    has read this host's hello (`HEARD`), the peer has ended, or the timeout is up."""
    import threading

    timeout = hosts_timeout() if timeout is None else timeout
    peers = cluster.addresses
    mine = peers.pop(cluster.task)
    _check_reachable(cluster.task, mine, peers)
    try:
        listener = socket.create_server(("", _host_port(mine)[1]), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", _host_port(mine)[1]))
    except OSError as exc:
        raise ConfigError(f"{TF_CONFIG}: this host ({cluster.task}, {mine}) cannot listen on its port: "
                          f"{exc.strerror or exc}") from None
    listener.settimeout(0.2)
    # unheard: the peers not reached yet, why: the last reason; unready: a peer reached, by the hosts it has not
    why: dict[str, str] = {}
    unheard, unready = dict(peers), {}
    me = secrets.token_hex(8)
    answer, stop = [hello(cluster, {task: [address, "not tried yet"] for task, address in peers.items()}, job, me,
                          checkpoint)], \
        threading.Event()
    heard_by, told, serving = set(), threading.Condition(), []  # heard_by: the tokens of the peers that read the hello

    def answer_peer(conn: socket.socket) -> None:
        """One probe (or TensorFlow's attempt): told this host's task and cluster, then read for the prober's word
        that it read them (`HEARD`), however late it comes (a prober stopped, or starved of CPU)."""
        with contextlib.suppress(OSError), conn:
            conn.settimeout(1)
            conn.sendall(answer[0])
            conn.settimeout(0.2)
            said = b""
            while not stop.is_set() and b"\n" not in said and len(said) < 256:
                try:
                    chunk = conn.recv(256)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                said += chunk
            if said.startswith(HEARD) and said.endswith(b"\n"):
                with told:
                    heard_by.add(said[len(HEARD):-1].decode(errors="replace"))
                    told.notify_all()

    def answer_peers() -> None:
        """The others' probes, each in a thread of its own: two hosts each reading the other's answer must not wait
        on each other, nor one prober's silence hold the others'."""
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except TimeoutError:
                continue
            except OSError:
                return
            serving[:] = [thread for thread in serving if thread.is_alive()]
            serving.append(threading.Thread(target=answer_peer, args=(conn,), daemon=True))
            serving[-1].start()

    def tell(task: str, address: str, said: bytes) -> None:
        """Having refused `task` (at `address`) on its hello (`said`): answer on until that host has read this host's
        hello, and so refuses in turn (its probe says so: `HEARD`), or nothing listens at its port any more (it
        ended), or $PIPELINE_HOSTS_TIMEOUT is up."""
        token, noted = _token(said), time.monotonic() + MOMENT
        while token != me and time.monotonic() < deadline:
            with told:
                if told.wait_for(lambda: token in heard_by, timeout=0.5):
                    return
            if _gone(address):
                return
            if noted and time.monotonic() > noted:
                print(f"{cluster.task}: refusing {task} ({address}), which has not read why yet: answering until it "
                      f"has (at most {max(deadline - time.monotonic(), 0):.0f} s more, ${HOSTS_TIMEOUT}; Ctrl-C "
                      f"stops)", flush=True)
                noted = 0

    answering = threading.Thread(target=answer_peers, daemon=True)
    answering.start()
    deadline, said, stuck = time.monotonic() + timeout, False, None
    try:
        while True:
            for task, address in peers.items():
                if task not in unheard and task not in unready:
                    continue
                try:
                    heard = _probe(address, me, max(0.1, min(2.0, deadline - time.monotonic())))
                except OSError as exc:
                    why[task] = exc.strerror or str(exc) or type(exc).__name__
                    continue
                if heard is None:  # stopped or starved of CPU (the kernel queues connections), or closing its port
                    why[task] = "its port answers nothing"
                    continue
                try:
                    waits = _check_peer(cluster, task, address, heard, job, me, checkpoint)
                except ConfigError:
                    tell(task, address, heard)  # so that the peer, probing, hears this host's hello and refuses too
                    raise
                unheard.pop(task, None)
                if waits:
                    unready[task] = waits
                else:
                    unready.pop(task, None)
            answer[0] = hello(cluster, {task: [address, why.get(task, "not tried yet")]
                                        for task, address in unheard.items()}, job, me, checkpoint)
            if not unheard and not unready:
                return
            if time.monotonic() > deadline:
                if unheard:
                    missing = ", ".join(f"{task} ({address}: {why.get(task, 'not tried')})"
                                        for task, address in unheard.items())
                    raise ConfigError(f"{TF_CONFIG}: {missing} did not start within {timeout:g} s "
                                      f"(${HOSTS_TIMEOUT}): start every host's command, or check TF_CONFIG's "
                                      f"addresses and that their ports are open between the hosts")
                raise ConfigError(f"{TF_CONFIG}: {_unreached(cluster, unready)} within {timeout:g} s "
                                  f"(${HOSTS_TIMEOUT}): check that host's TF_CONFIG addresses, and that their ports "
                                  f"are open between the hosts")
            if unheard and not said:
                print(f"{cluster.task}: waiting for {', '.join(f'{t} ({a})' for t, a in unheard.items())} to start "
                      f"(at most {timeout:g} s, ${HOSTS_TIMEOUT}; Ctrl-C stops)", flush=True)
                said = True
            if unheard or not unready:
                stuck = None
            elif stuck is None:
                stuck = time.monotonic()
            elif stuck and time.monotonic() - stuck > MOMENT:  # said once: a moment's wait is every start's
                print(f"{cluster.task}: {_unreached(cluster, unready)} yet: waiting (at most {timeout:g} s, "
                      f"${HOSTS_TIMEOUT}; Ctrl-C stops)", flush=True)
                stuck = 0
            time.sleep(0.2)
    finally:
        stop.set()
        answering.join()
        for thread in serving:
            thread.join()
        listener.close()


def _check_reachable(task: str, mine: str, peers: dict[str, str]) -> None:
    """ConfigError where this host (`task`) is at a loopback address (`mine`: localhost, 127.x, [::1]) and a peer is
    on another machine, which can never reach it there: with the same port that peer reached its own port at
    "localhost" and was told this host's task was started as its own; with another it waited for good. A peer is on
    another machine where each address its name resolves to is one no interface here has (no socket binds to it);
    one that does not resolve (yet) is left to `wait_for_hosts`, which says so."""
    if not _is_loopback(_host_port(mine)[0]):
        return
    for peer, address in peers.items():
        host, port = _host_port(address)
        try:
            ips = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError):
            continue
        if ips and not any(_is_loopback(ip) or _is_local(ip) for ip in ips):
            raise ConfigError(f"{TF_CONFIG}: this host ({task}) is at {mine}, a loopback address, which {peer} "
                              f"({address}), on another machine, cannot reach: give this host's name or address as "
                              f"the others reach it")


def _is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _is_local(ip: str) -> bool:
    """Whether `ip` is an address of this machine: a socket binds to it."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


def _unreached(cluster: Cluster, unready: dict[str, dict]) -> str:
    """'worker 1 (its address) did not reach worker 2 at (the address it tried) (why; where this host reaches it)'
    for each peer of `cluster` that, in its hello, said it waits for others (`unready`)."""
    addresses = cluster.addresses
    said = []
    for peer, waits in unready.items():
        for task, (address, why) in waits.items():
            here = f"{task} is this host, at" if task == cluster.task else "this host reaches it at"
            said.append(f"{peer} ({addresses[peer]}) did not reach {task} at {address} ({why}; {here} "
                        f"{addresses.get(task, '?')})")
    return "; ".join(said)


def _probe(address: str, me: str = "", wait: float = 2) -> bytes | None:
    """What `address` answers first: a waiting host's whole `hello` (answered with this host's word that it read it,
    `HEARD`, and `me`), or another server's first bytes (TensorFlow's gRPC server speaks first: an HTTP/2 SETTINGS
    frame); None where it said no whole hello within `wait` s, or closed the connection first. That is no answer: a
    host stopped or starved of CPU still has its connections accepted (by the kernel) and says nothing, and one
    closing its port resets them; taken for TensorFlow's, such a host was taken to have met every host, and never
    probed again. OSError where nothing listens there."""
    with socket.create_connection(_host_port(address), timeout=1) as sock:
        said, end = b"", time.monotonic() + wait
        with contextlib.suppress(OSError):
            while len(said) < 1 << 16 and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                if not (chunk := sock.recv(4096)):
                    return None
                said += chunk
                if not said.startswith(HELLO[:len(said)]):
                    return said
                if b"\n" in said:
                    with contextlib.suppress(OSError):  # a listener that closed at once (an earlier version's)
                        sock.sendall(HEARD + me.encode() + b"\n")
                    return said
        return said if len(said) >= 1 << 16 else None


def _token(said: bytes) -> str | None:
    """The token (`me`) of the wait that sent the hello `said`; None where it has none."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(said[len(HELLO):])["me"]) or None
    return None


def _gone(address: str) -> bool:
    """Whether nothing listens at `address` any more (the host there ended). A host stopped or starved of CPU still
    has its connections accepted (by the kernel's queue)."""
    try:
        with socket.create_connection(_host_port(address), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _check_peer(cluster: Cluster, task: str, address: str, said: bytes, job: dict[str, str] | None = None,
                me: str = "", checkpoint: tuple[int, int] | None = None) -> dict[str, list[str]]:
    """ConfigError where the host at `address` (`task` of this host's `cluster`) is this host itself (its `hello`
    carries this wait's token `me`: `address` leads back to this machine), or said that it was started with another
    cluster (other tasks, or another port for one), as another task, or with another digest of a part of this host's
    `job` (other params, code or data: refused before any run opens, where `Distribution.agree` refused them once the
    chief had opened its runs and prepared the data), or, between the chief and another host, with a checkpoint
    (`checkpoint`: epochs, the chief's run) the other's cannot go on with (`check_checkpoints`); else the hosts it said
    it has not reached yet (task: [address, why]). Anything else it said (TensorFlow, once the host has met the others
    and gone on) is taken as it answering, having reached them all."""
    if not said.startswith(HELLO) or not said.endswith(b"\n"):
        return {}
    try:
        theirs = json.loads(said[len(HELLO):])
        spec, claimed = theirs["cluster"], theirs["task"]
        # The tasks and their ports: one host may have several names (a short and a full one, an address of each of
        # its networks), which TensorFlow reaches alike
        same = {t: _address_key(a)[1] for t, a in Cluster(spec, "", 0).addresses.items()} == \
            {t: _address_key(a)[1] for t, a in cluster.addresses.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    if me and theirs.get("me") == me:
        raise ConfigError(f"{TF_CONFIG}: {task}'s address, {address}, reaches this host ({cluster.task}) itself: give "
                          f"{task} the address the other hosts reach its machine at")
    if not same:
        raise ConfigError(f"{TF_CONFIG}: {task} ({address}) was started with another cluster, {json.dumps(spec)}, "
                          f"than this host ({cluster.task}), {json.dumps(cluster.spec)}: give every host the same "
                          f"{TF_CONFIG} 'cluster', and each its own 'task'")
    if claimed != task:
        raise ConfigError(f"{TF_CONFIG}: {address}, {task} of the cluster, was started as {claimed}: give each host "
                          f"its own {TF_CONFIG} 'task' (its type and index)")
    theirs_job = theirs.get("job") if isinstance(theirs.get("job"), dict) else {}  # none: an earlier version's hello
    differ = [part for part in job or {} if theirs_job.get(part, job[part]) != job[part]]
    if differ:
        raise ConfigError(f"{TF_CONFIG}: {task} ({address}) was started with other {' and other '.join(differ)} than "
                          f"this host ({cluster.task}): start every host with the same code, params, epochs, overrides "
                          f"and data")
    held = theirs.get("checkpoint")  # none: not known on that host before its runs open, or an earlier version
    chief = cluster.tasks[0]
    if checkpoint is not None and chief in (cluster.task, task) and isinstance(held, list) and len(held) == 2 and \
            all(isinstance(n, int) and not isinstance(n, bool) for n in held):
        check_checkpoints(chief, {t: tuple(h) for t, h in sorted({cluster.task: checkpoint, task: held}.items(),
                                                                 key=lambda item: cluster.tasks.index(item[0]))})
    waiting = theirs.get("waiting")
    if not isinstance(waiting, dict):
        return {}
    return {str(t): [str(w[0]), str(w[1])] if isinstance(w, list) and len(w) == 2 else [str(w), "unreached"]
            for t, w in waiting.items()}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        raise ConfigError(f"{TF_CONFIG}: {address!r} is not a 'host:port' address")
    return host.strip("[]"), int(port)


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


HOST_LOST = "stopped answering"


@contextlib.contextmanager
def host_lost_as_step_failure(own: str = "", before: str = ""):
    """A host of the cluster lost (killed, crashed, unreachable) as one line (`host_lost`): TensorFlow's
    coordination service notices its missing heartbeats, or its closed connection, and aborts every collective with
    an UnavailableError or AbortedError several screens long. own, before: see `host_lost`."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as exc:
        raise host_lost(exc, own, before) from None


def host_lost(exc: Exception, own: str = "", before: str = ""):
    """`_host_lost`'s StepFailed, marked as one the cluster knows of."""
    failure = _host_lost(exc, own, before)
    failure.host_lost = True  # the cluster knows (`Distribution.telling_the_others`)
    return failure


def _host_lost(exc: Exception, own: str = "", before: str = ""):
    """The StepFailed for TensorFlow's UnavailableError or AbortedError `exc`, naming the host lost (this host itself
    where the cluster took it for lost). Every host's checkpoint keeps its completed epochs, so rerunning every host's
    command continues the run.
    own: this host's task ("worker 0"), never the one lost: TensorFlow's `{{function_node ...}}` prefix names this
    host's own device (a peer that lost worker 1 said "worker 0, worker 1 stopped answering").
    before: the chief's task, set from the hosts' first collective (`Distribution.agree`) until `fit`'s first step
    (`Distribution.before_training`, `_host_lost_as_step_failure`): a host lost there ended before training began,
    most often with an error of its own (the chief's prepare failing on a bad data path, its model or datasets
    failing to build, a ConfigError on it alone): said so, and where its error is, rather than TensorFlow's
    traceback, or "stopped answering" and a rerun that would continue."""

    from pipeline.tracking import StepFailed

    # the op and function names TensorFlow wraps around its message (the local device's among them)
    text = re.sub(r"\{\{[^{}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", "", str(exc))
    named = {f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)}
    lost = sorted(named - {own})
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    said = next((line for line in lines if re.search(r"unhealthy|heartbeat|aborted|unavailable|connect", line,
                                                     re.IGNORECASE)), lines[0])
    if own and named == {own} and re.search(r"heartbeat timeout|already-in-error", text):
        # the cluster took this host itself for lost: its heartbeats came late (a host too busy or stopped, or a
        # clock jump), and every collective of every host is aborted
        if timed_out := re.search(r"Task \S+ heartbeat timeout", text):
            said = timed_out.group()
        return StepFailed(f"{TF_CONFIG}: the cluster took this host ({own}) for lost: its heartbeats came more than "
                          f"{heartbeat_timeout():g} s apart, ${HEARTBEAT_TIMEOUT} (TensorFlow: {said[:200]}). "
                          f"Completed epochs stay checkpointed on every host: rerun every host's command to continue "
                          f"(with a larger ${HEARTBEAT_TIMEOUT} on every host if this one was busy)")
    if before:
        who = ", ".join(f"{task} (the chief)" if task == before else task for task in lost) or \
            "a host of the cluster"
        where = (" (and, where the chief could end its MLflow run, in that run's failure_reason tag)"
                 if before in lost else "")
        return StepFailed(f"{TF_CONFIG}: {who} ended before training began (TensorFlow: {said[:200]}): nothing was "
                          f"trained. Its own output says why{where}: fix that, then rerun every host's command")
    return StepFailed(f"{TF_CONFIG}: {', '.join(lost) or 'a host of the cluster'} {HOST_LOST} (TensorFlow: "
                      f"{said[:200]}): the other hosts cannot train without it. Completed epochs stay "
                      f"checkpointed on every host: once it is back, rerun every host's command to continue")


def _report_to_cluster(cluster: Cluster, exc: BaseException) -> None:
    """Tell the coordination service that this host ends with `exc` (its first line), waiting for it at most 5 s: a
    service already gone must not hold the host's exit."""
    import threading

    import tensorflow as tf
    from tensorflow.python.eager import context

    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    message = f"/job:{cluster.task_type}/replica:0/task:{cluster.index} ended with an error of its own: {line}"

    def report():
        with contextlib.suppress(Exception):
            context.context().report_error_to_cluster(tf.errors.UNAVAILABLE, message)

    thread = threading.Thread(target=report, name="report-to-cluster", daemon=True)
    thread.start()
    thread.join(5)


def _host_lost_as_step_failure(model: keras.Model, own: str, chief: str) -> None:
    """`model.fit` raising `host_lost`'s error instead of TensorFlow's: until its first train step has ended here,
    that the host lost ended before training began (the chief failing between building the model and `fit`, in
    opening its MLflow run, say, left the others in the first step's collective), then that it stopped answering."""
    import keras
    import tensorflow as tf

    fit = model.fit

    class FirstStep(keras.callbacks.Callback):
        async_safe = True  # sets a flag, reads no logs
        ended = False

        def on_train_batch_end(self, batch, logs=None):
            self.ended = True

    def fit_or_host_lost(*args, **kwargs):
        first = FirstStep()
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or ()), first]
        try:
            return fit(*args, **kwargs)
        except (tf.errors.UnavailableError, tf.errors.AbortedError) as exc:
            raise host_lost(exc, own, before="" if first.ended else chief) from None

    model.fit = fit_or_host_lost
