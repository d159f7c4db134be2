"""`python -m pipeline.tracking`: create the tracking store if missing, or check that it answers (see `ensure_store`).

`--settle RUN_ID STATUS PID [--delete]` is internal: see `_settle_wrapper_run`.
"""

import argparse
import sys

from pipeline.tracking import _settle, cli, store_ready

if sys.argv[1:2] == ["--settle"]:
    _settle(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--delete" in sys.argv[5:])
else:
    # read before the store is touched: `--help`, or a typo's argument, created the store and printed "ready"
    argparse.ArgumentParser(
        prog="python -m pipeline.tracking",
        description="Create the tracking store MLFLOW_TRACKING_URI names (by default sqlite:///mlflow.db here) if it "
                    "is missing, under a file lock, or check that it answers; print the store and 'ready', or one "
                    "line naming what is wrong and exit non-zero.").parse_args()
    # The store created or probed (by cli first): a server that does not answer, or a URI MLflow cannot open, is one
    # line and a non-zero exit, not "ready"
    cli(lambda: print(store_ready()))
