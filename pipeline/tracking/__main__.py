"""`python -m pipeline.tracking`: create the tracking store if missing, or check that it answers (see `ensure_store`).

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
    argparse.ArgumentParser(
        prog="python -m pipeline.tracking",
        description="Create the tracking store MLFLOW_TRACKING_URI names (by default sqlite:///mlflow.db here) if it "
                    "is missing, under a file lock, or check that it answers; print the store and 'ready', or one "
                    "line naming what is wrong and exit non-zero.").parse_args()
    # The store created or probed (by cli first): a server that does not answer, or a URI MLflow cannot open, is one
    # line and a non-zero exit, not "ready"
    tracking.cli(lambda: print(tracking.store_ready()))
