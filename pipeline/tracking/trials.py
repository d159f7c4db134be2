"""The sweep's side of the tracking layer: trial runs, how they end, and the sweep's parent run.

A trial's run is created as a child of the sweep run (`create_trial_run`) and entered in the worker
that claimed the trial (`enter_run`, `end_run`). `fail_trial_runs` ends a dead worker's trial run and
the runs still open under it FAILED; `supersede_trial_runs` tags a trial run queued again, and its runs,
`superseded_by_retry`; `end_pruned_train` ends a pruned train run KILLED. `run_tags`,
`run_status`, `run_stage` and `final_metric` read a run back, `sweep_runs` finds a study's sweep runs;
`parent_run` re-enters the sweep run where another worker opened it (and ends it: FAILED where no trial finished);
`adopt_wrapper_run` makes the run `mlflow run` opened for a joining command a child of the sweep run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from pipeline import interrupts
from pipeline.tracking import written_despite_a_race


def create_trial_run(experiment_id: str, parent_id: str, run_name: str, tags: dict[str, str]) -> str:
    """Create (not enter) a child run of `parent_id` in `experiment_id`, tagged `tags`; its id."""
    created = MlflowClient().create_run(experiment_id, run_name=run_name,
                                        tags={"mlflow.parentRunId": parent_id, **tags})
    return created.info.run_id


def enter_run(run_id: str) -> None:
    """Make existing run `run_id` the active run (nested in whatever run is active); see `end_run`."""
    mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)


def end_run(status: str, run_id: str | None = None) -> None:
    """End the active run with `status` (FINISHED, FAILED, KILLED); with `run_id`, that run, entered or not (a signal
    can come between its creation and `enter_run`). A signal meanwhile is raised once the status is written
    (`interrupts.deferred`): MLflow takes the run off its stack first, and it stayed RUNNING for good."""
    active = mlflow.active_run()
    with interrupts.deferred():
        if run_id is None or (active is not None and active.info.run_id == run_id):
            mlflow.end_run(status)
        else:
            MlflowClient().set_terminated(run_id, status)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Set `tags` on run `run_id`, entered or not."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


@contextlib.contextmanager
def parent_run(run_id: str, status: str = "FINISHED") -> Iterator[None]:
    """Inside run `run_id`: as it is if that run is already active (its opener ends it), else entered (nested) for
    the block and ended with `status` if the block ends without an error, KILLED with tag `interrupted_by` on a
    SIGTERM/SIGINT (one while MLflow reopens it is raised once it is open: `interrupts.deferred`), else FAILED."""
    from pipeline.tracking import Interrupted  # (it imports this module's users)

    active = mlflow.active_run()
    if active and active.info.run_id == run_id:
        yield
        return
    with contextlib.ExitStack() as entered:
        try:
            with interrupts.deferred():
                entered.enter_context(mlflow.start_run(run_id=run_id, nested=active is not None))
            yield
        except (Interrupted, KeyboardInterrupt) as exc:
            if (opened := mlflow.active_run()) is not None and opened.info.run_id == run_id:
                mlflow.set_tag("interrupted_by", signal.Signals(getattr(exc, "signum", signal.SIGINT)).name)
                mlflow.end_run("KILLED")
                exc.ended_runs = True  # for `cli`'s line: a run was open
            raise
        end_run(status)


def fail_trial_runs(run_id: str, reason: str) -> None:
    """End trial run `run_id` and its child runs still RUNNING FAILED, each tagged `failure_reason`."""
    client = MlflowClient()
    for child in client.search_runs([client.get_run(run_id).info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"):
        set_tag(child.info.run_id, "failure_reason", reason)
        client.set_terminated(child.info.run_id, "FAILED")
    set_tag(run_id, "failure_reason", reason)
    client.set_terminated(run_id, "FAILED")


def amend_ended_run(run_id: str, status: str, *, drop: tuple[str, ...], note: str) -> None:
    """End run `run_id` (ended already) `status` instead, without tags `drop`, its note in the MLflow UI `note`."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    for key in drop:
        if key in tags:
            client.delete_tag(run_id, key)
    client.set_tag(run_id, "mlflow.note.content", note)
    client.set_terminated(run_id, status)


def supersede_trial_runs(run_id: str) -> None:
    """Tag trial run `run_id` and its child runs `superseded_by_retry` = "true": its trial was queued again, and the
    retry's runs count instead (a sweep registers and compares Optuna's COMPLETE trials; `compare` lists no run so
    tagged unless named)."""
    client = MlflowClient()
    for child in client.search_runs([client.get_run(run_id).info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{run_id}'"):
        set_tag(child.info.run_id, "superseded_by_retry", "true")
    set_tag(run_id, "superseded_by_retry", "true")


def set_tag(run_id: str, key: str, value: str) -> None:
    """Set tag `key` of run `run_id`, once more where another worker's insert of it came first (MLflow looks for the
    tag, then inserts it: `written_despite_a_race`): a worker whose heartbeat came late tags its trial's runs failed
    and superseded as the worker that took it for stopped does."""
    written_despite_a_race(lambda: MlflowClient().set_tag(run_id, key, value), "tags")


def end_pruned_train(run_id: str, epochs: int) -> None:
    """A train run the pruner stopped after `epochs`: tag `pruned_at_epoch`, end it KILLED."""
    client = MlflowClient()
    client.set_tag(run_id, "pruned_at_epoch", str(epochs))
    client.set_terminated(run_id, "KILLED")


def run_tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def run_status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def run_stage(run_id: str) -> str | None:
    """The run's lifecycle stage (active, deleted), or None where this tracking store has no such run."""
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def sweep_runs(study: str, storage: str) -> list[str]:
    """The ids of the sweep runs (tag step = sweep) of Optuna study `study` in `storage` (tags optuna_study and
    optuna_storage, a URL without its password) in this tracking store, in any experiment not deleted, newest first."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.step = 'sweep'", order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs
            if r.data.tags.get("optuna_study") == study and r.data.tags.get("optuna_storage") == storage]


def final_metric(run_id: str, key: str) -> float:
    """The run's last logged value of metric `key`; NaN if it has none."""
    return MlflowClient().get_run(run_id).data.metrics.get(key, math.nan)


def adopt_wrapper_run(tags: dict[str, str]) -> bool:
    """Under `mlflow run` (MLFLOW_RUN_ID set), set `tags` on the run it opened for this command; False elsewhere."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    set_run_tags(run_id, tags)
    return True
