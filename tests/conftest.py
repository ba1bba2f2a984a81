"""Suite-wide: how the pytest process ends once Ray has been used in it.

Ray's core worker leaves native threads behind in a driver process even after ``ray.shutdown()``
(threads that call back into Python appear as ``Dummy-N`` in ``threading.enumerate()``). Interpreter
finalization racing one of them aborted a CI run with SIGABRT (exit 134) after the last test, with the
final summary still in stdout's buffer. So when Ray was imported, the process ends with ``os._exit``
and pytest's own exit status, after pytest has written and flushed everything: the same status, no
finalization to race. Nothing a test asserts depends on finalization (atexit handlers of the code
under test run in the subprocesses and Ray workers the tests start, which exit normally).
"""

from __future__ import annotations

import os
import sys

import pytest

_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    if _exit_status is None or "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
