"""pytest options for vmsplicemove's suite: --soak runs the long versions."""

import faulthandler
import os
import signal
import threading

import pytest


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the reliability tests at full length (minutes, not seconds)")


@pytest.fixture
def soak(request):
    """True under --soak: tests scale their case counts up."""
    return request.config.getoption("--soak")


@pytest.fixture(autouse=True)
def watchdog(request):
    """A test that hangs fails instead of blocking CI: after the limit a real
    SIGINT interrupts whatever call it is stuck in, and pytest reports where;
    if even that does not end it, faulthandler prints every thread and exits."""
    limit = 1800 if request.config.getoption("--soak") else 180
    timer = threading.Timer(limit, os.kill, (os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    yield
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()
