"""The processes a command starts itself (`processes` > 1): launched as `torchrun --standalone
--nproc-per-node N` would launch them, and ended with their launcher.

Torch-free at import: `python -m pipeline` calls `end_with_launcher` before anything heavy loads, so a
process whose launcher is gone (killed by `kill -9` while it starts, or mid-job) ends within seconds
instead of waiting forever on the job's store or a collective, holding its memory and, on a GPU
machine, its GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

from pipeline.config import LAUNCHED_ENV

LAUNCHER_PID_ENV = "LOGIT_CACHE_LAUNCHER_PID"  # set by `launch` for the processes it starts
PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent ends
WATCH_EVERY_S = 1.0


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m pipeline ARGV` on `processes` processes of this machine, as `torchrun --standalone
    --nproc-per-node N` would, and return the job's exit status: the status of the process that failed
    first (a refusal: 2, as without torchrun), without torchrun's page of ChildFailedError traceback;
    130 on Ctrl-C. The processes print a refusal once (rank 0; see SaidByAnother), and end when this
    process does (`end_with_launcher`)."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own notes and tracebacks
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, as torchrun sets it
    os.environ[LAUNCHED_ENV] = "1"
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "pipeline", *argv)
    except ChildFailedError as error:
        _, first = error.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # killed by signal N: 128 + N
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0


def end_with_launcher() -> None:
    """In a process of a job (started by `launch`, or by a user's torchrun): end it (SIGTERM) when the
    process that launched it ends. Linux's parent-death signal does it at once; a watchdog thread checks
    the parent every WATCH_EVERY_S as well (that signal follows the launcher's thread that started the
    process, which may end first, and other systems have none). Elsewhere: nothing."""
    if not (os.environ.get(LAUNCHED_ENV) or os.environ.get("TORCHELASTIC_RUN_ID")):
        return
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid())
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == launcher:  # once the launcher is gone, the process is another's child
            time.sleep(WATCH_EVERY_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-launcher", daemon=True).start()
