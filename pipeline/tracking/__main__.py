"""`python -m pipeline.tracking`: create the tracking store if missing, or check that it answers (see `ensure_store`);
with `--prune-checkpoints`, then remove the checkpoints of runs deleted in it (`resume.prune_checkpoints`).

`--settle RUN_ID STATUS PID [--delete]` is internal: see `_settle_wrapper_run`.
"""

import argparse
import sys

from pipeline import tracking

if sys.argv[1:2] == ["--settle"]:
    # read as the rest are: an argument missing or wrong was an IndexError or ValueError traceback
    settle = argparse.ArgumentParser(prog="python -m pipeline.tracking --settle",
                                     description="Once process PID has exited, end run RUN_ID with STATUS (and "
                                                 "delete it): the run `mlflow run` opened for a step.")
    settle.add_argument("run_id")
    settle.add_argument("status", choices=["FINISHED", "FAILED", "KILLED"])
    settle.add_argument("pid", type=int)
    settle.add_argument("--delete", action="store_true")
    args = settle.parse_args(sys.argv[2:])
    tracking._settle(args.run_id, args.status, args.pid, args.delete)
else:
    # read before the store is touched: `--help`, or a typo's argument, created the store and printed "ready"
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tracking",
        description="Create the tracking store MLFLOW_TRACKING_URI names (by default sqlite:///mlflow.db here) if it "
                    "is missing, under a file lock, or check that it answers; print the store and 'ready', or one "
                    "line naming what is wrong and exit non-zero.")
    parser.add_argument("--prune-checkpoints", action="store_true",
                        help="then remove the checkpoints (checkpoints/ or $PIPELINE_CHECKPOINT_DIR) of training runs "
                             "deleted in this store (in MLflow's trash, or gone after mlflow gc), naming each; never "
                             "those of runs present, live or ended")
    args = parser.parse_args()

    def ready() -> None:
        print(tracking.store_ready())
        if args.prune_checkpoints:
            from pipeline.tracking import resume

            lines = resume.prune_checkpoints()
            removed = sum(line.startswith("removed ") for line in lines)
            print(*lines, sep="\n", end="\n" if lines else "")
            print(f"{removed} checkpoint folder{'s' * (removed != 1)} of deleted runs removed from "
                  f"{tracking.checkpoint_root()}")

    # The store created or probed (by cli first): a server that does not answer, or a URI MLflow cannot open, is one
    # line and a non-zero exit, not "ready"
    tracking.cli(ready)
