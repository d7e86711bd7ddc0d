"""A refinement fine-tune that never ends: it writes its worker's process id to the file it is
given (as its policy) and sleeps. Used by the refinement's deadline test, imported by Ray workers
by its import path ``tests.stalled_fine_tune``."""
from __future__ import annotations

import os
import time
from pathlib import Path


def stall(policy, *rest):
    Path(policy).write_text(str(os.getpid()))
    time.sleep(60)  # far past the test's deadline; a refinement that waits for it fails the test
    return {"accuracy": 1.0, "time_refine_s": 60.0}
