"""`python -m pipeline.tracking`: create the tracking store if missing, or check that it answers (see `ensure_store`).

`--settle RUN_ID STATUS PID [--delete]` is internal: see `_settle_wrapper_run`.
"""

import sys

from pipeline.tracking import _settle, cli, store_ready

if sys.argv[1:2] == ["--settle"]:
    _settle(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--delete" in sys.argv[5:])
else:
    # The store created or probed (by cli first, but for `--help`, which this command does not read): a server that
    # does not answer, or a URI MLflow cannot open, is one line and a non-zero exit, not "ready"
    cli(lambda: print(store_ready()))
