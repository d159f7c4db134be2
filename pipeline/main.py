"""The `main` entry point: prepare -> train -> evaluate -> register as nested runs of one parent.

Steps talk only through URIs: prepare returns a dataset URI (an identical finished prepare
run is reused), train a model URI, evaluate records test metrics on that model, register
reads them. The parent run holds the resolved params and the headline results. Inputs are
checked before any run opens and before Keras loads (`pipeline.inputs`, shared with the train entry
point); the console ends with where to look at the run.
"""

from __future__ import annotations

from pipeline import config, inputs, prepare
from pipeline.distribute import Distribution, cluster_from_env, distribution
from pipeline.tracking import cli, failing_step, log_params, set_tags, step_run, steps, ui_hint
from pipeline.tracking.resume import main_lock, mark_pipeline_done, remove_stale_locks, trained_before_a_failure


def run(cfg: config.Config, *, resume: str = "", dataset_uri: str = "", dist: Distribution | None = None) -> dict:
    """Run the whole pipeline inside the active (parent) run; return the headline results.

    resume: "" continues an interrupted identical train run if one left a checkpoint and no live
    process trains it, or, where an identical command trained a model and then failed in evaluate or register,
    goes on from that model (`trained_before_a_failure`); "never" always starts afresh, a run id continues that
    run, whose params must equal `cfg`'s except a larger `train.epochs` (see inputs.resolve_inputs,
    tracking.resume.config_to_resume). dist: see `train.run`.
    """
    from pipeline import evaluate, register, train  # Keras loads only once the params are known to be good

    log_params(cfg.flat())
    if not dataset_uri:  # a failing step is named on the parent run (tag `failed_step`) and on the console's last line
        with failing_step("prepare"):
            dataset_uri = prepare.ensure_prepared(cfg)
    with failing_step("train"):  # a dataset refused as too small for the params refuses the train step
        dataset_uri, resume_id = inputs.resolve_inputs(cfg, resume=resume, dataset_uri=dataset_uri)
    trained = None if resume_id or resume else trained_before_a_failure(cfg, dataset_uri)
    if trained:  # an identical command trained it, then failed in evaluate or register: go on from there
        train_run_id, model_uri = trained
        print(f"reusing train run {train_run_id}: an identical command trained it and stopped before its pipeline "
              f"finished (in evaluate or register)")
        if dist and dist.cluster:  # the other hosts, started to train it, wait for the chief: they end at once
            train.skip_training(cfg, dataset_uri, dist)
    else:
        if resume_id:  # nested in the main that started it, not in this one: named before it trains (`resume=` of
            set_tags({"train_run_id": resume_id})  # this main, stopped in training, names the run to give)
        with failing_step("train"), step_run(cfg, "train", run_name=cfg.run_name(),
                                             resume_run_id=resume_id) as train_run:
            model_uri = train.run(cfg, dataset_uri, dist)
        train_run_id = train_run.info.run_id
    if dist:  # evaluate and register on one device (train.run ends a distribution it trained under)
        dist.end()
    set_tags({"train_run_id": train_run_id})
    rerun = rerun_after_training(resume, train_run_id)
    with failing_step("evaluate", rerun=rerun), step_run(cfg, "evaluate"):
        metrics = evaluate.run(cfg, model_uri, dataset_uri)
    with failing_step("register", rerun=rerun), step_run(cfg, "register"):
        decision = register.run(cfg, model_uri)
    steps.log_pipeline_results(dataset_uri, model_uri, metrics, decision)
    mark_pipeline_done(train_run_id)
    return {"dataset_uri": dataset_uri, "model_uri": model_uri, **metrics, **decision}


def rerun_after_training(resume: str, train_run_id: str) -> str:
    """What a rerun does after a failure in evaluate or register (the train run finished, its checkpoint deleted):
    goes on from the model (`trained_before_a_failure`), unless it is given a resume, which trains."""
    how = "the same command" if not resume else "the same command without resume"
    return (f" The model is trained (train run {train_run_id}): rerun {how} to evaluate and register it, without "
            f"training it again.")


def main() -> None:
    args = config.entry_point_parser("main", __doc__.split("\n")[0], resume=config.RESUME_HELP).parse_args()
    cfg = config.load_from_cli(args.params, args.overrides, epochs=args.epochs, data=args.data)
    cfg, dataset_uri = inputs.check_inputs(cfg, resume=args.resume)
    # Before any run opens, as the train entry point does: a mode this backend or host cannot run (data_parallel on
    # TensorFlow, multi_worker without TF_CONFIG) is refused here, not after prepare in an empty train run. In a
    # cluster the hosts meet first (`distribute.wait_for_hosts`): one that never comes, or Ctrl-C while waiting for
    # it, leaves no run behind
    from pipeline import train  # Keras loads here, the params known to be good

    cluster = cluster_from_env()
    dist = distribution(cfg.train.distribute,
                        job={**train.meeting_job(cfg), **train.meeting_data(cfg, dataset_uri, args.resume)},
                        checkpoint=train.chief_checkpoint(cfg, args.resume, dataset_uri) if cluster else None)
    inputs.check_known_batches(cfg, dist, dataset_uri)  # the replicas known: a batch they cannot share, before prepare
    with main_lock() as hold, step_run(cfg, "main", run_name=f"main-{cfg.run_name()}") as parent:
        # Held until its run has ended: a later main tells this one, RUNNING, from one killed (SIGKILL, the OOM
        # killer: left RUNNING with the step it was in), whose runs it ends KILLED (`remove_stale_locks`) and whose
        # trained model a rerun goes on from (`trained_before_a_failure`)
        remove_stale_locks()
        hold(parent.info.run_id)
        run(cfg, resume=args.resume, dataset_uri=dataset_uri, dist=dist)
    print(ui_hint(parent))


if __name__ == "__main__":
    cli(main, resumable=True)
