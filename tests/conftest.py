"""Suite-wide: the root logger cleaned after each test, and how the pytest process ends once Ray has been used in it.

Ray's core worker leaves native threads behind in a driver process even after ``ray.shutdown()``
(threads that call back into Python appear as ``Dummy-N`` in ``threading.enumerate()``). Interpreter
finalization racing one of them aborted a CI run with SIGABRT (exit 134) after the last test, with the
final summary still in stdout's buffer. So when Ray was imported, the process ends with ``os._exit``
and pytest's own exit status, after pytest has written and flushed everything: the same status, no
finalization to race. Nothing a test asserts depends on finalization (atexit handlers of the code
under test run in the subprocesses and Ray workers the tests start, which exit normally).
"""

from __future__ import annotations

import logging
import os
import sys

import pytest

_exit_status: int | None = None


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs a CLI's main() leaves setup_logging's handler on that test's captured stderr, and
    every later test would log into a closed file: the plain StreamHandlers a test added go with it
    (pytest's own handlers are subclasses, added and removed by pytest per phase)."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if type(h) is logging.StreamHandler and h not in before:
            root.removeHandler(h)
    root.setLevel(level)


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
