"""pytest options for vmsplicemove's suite: --soak runs the long versions;
the marker ``needs_vmsplice`` skips a test where vmsplice(2) cannot be used;
``stability`` marks the tests .ci/run repeats."""

import signal

import pytest


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="run the long tests (storms, cycles, random transfers) for minutes, not seconds")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_vmsplice: the test calls vmsplice(2) itself or checks what it does; skipped "
        "where probe().vmsplice is False (gVisor, a seccomp profile that refuses it)")
    config.addinivalue_line(
        "markers",
        "stability: timing- or signal-sensitive (signal storms, interrupts, threads that wait for "
        "each other): .ci/run runs `pytest -m stability` again, five times on the oldest and the "
        "newest CPython, to prove that none of them fails by chance")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_vmsplice") is not None:
        import vmsplicemove

        support = vmsplicemove.probe()
        if not support.vmsplice:
            pytest.skip(f"vmsplice cannot be used here: {support.reason}")


@pytest.fixture
def soak(request):
    """True under --soak: tests scale their case counts up."""
    return request.config.getoption("--soak")


@pytest.fixture(autouse=True)
def watchdog(request):
    """A test that hangs fails instead of blocking CI: SIGALRM interrupts the
    call it is stuck in and raises.  No thread: the suite forks, and threads
    do not survive fork.  A test with a SIGALRM timer of its own replaces this."""
    limit = 1800 if request.config.getoption("--soak") else 180

    def expired(signum, frame):
        raise TimeoutError(f"the test was still running after {limit} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
