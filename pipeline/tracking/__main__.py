"""`python -m pipeline.tracking`: create the tracking store if missing (see `ensure_store`).

`--settle RUN_ID STATUS PID [--delete]` is internal: see `_settle_wrapper_run`.
"""

import sys

from pipeline.tracking import _settle, ensure_store

if sys.argv[1:2] == ["--settle"]:
    _settle(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--delete" in sys.argv[5:])
else:
    print(f"tracking store {ensure_store()} ready")
