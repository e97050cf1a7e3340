"""The SuperNode launcher: Flower's own SuperNode, with only the wait after an empty pull shortened."""

import os
import subprocess
import sys
import time
import types

import pytest

from cdcca.fleet import supernode


def test_the_idle_clock_shortens_only_flowers_idle_wait():
    clock = supernode.IdleClock(0.01)
    t0 = time.monotonic()
    clock.sleep(supernode.FLOWER_IDLE_S)
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    clock.sleep(0.2)                            # any other wait is Flower's own
    assert time.monotonic() - t0 >= 0.19
    assert clock.time is time.time and clock.monotonic is time.monotonic


def test_the_launcher_patches_the_pull_loop_of_the_installed_flower():
    """Guards the pinned Flower: its pull loop still keeps `time` as a module global and waits 3 s when idle."""
    import inspect

    from flwr.supernode import start_client_internal as loop

    assert loop.time is time and "time.sleep(3)" in inspect.getsource(loop)
    fake = types.ModuleType("pull_loop")
    fake.time = time
    supernode.shorten_idle_wait(fake, 0.5)
    assert isinstance(fake.time, supernode.IdleClock) and fake.time.idle_s == 0.5
    supernode.shorten_idle_wait(fake, 0.25)                 # again: still patched once, with the new wait
    assert fake.time.idle_s == 0.25


def test_a_changed_pull_loop_or_a_bad_wait_is_refused():
    changed = types.ModuleType("pull_loop")
    with pytest.raises(RuntimeError, match=r"flwr==1\.42\.0"):
        supernode.shorten_idle_wait(changed, 0.5)
    with pytest.raises(ValueError, match="> 0"):
        supernode.IdleClock(0.0)


def test_the_launcher_names_a_bad_idle_wait_in_one_line():
    env = {**os.environ, supernode.IDLE_ENV: "soon"}
    out = subprocess.run([sys.executable, "-m", "cdcca.fleet.supernode", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == f"{supernode.IDLE_ENV} must be a number of seconds > 0, got 'soon'"


def test_the_launcher_takes_flower_supernodes_arguments():
    out = subprocess.run([sys.executable, "-m", "cdcca.fleet.supernode", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--superlink" in out.stdout and out.stdout.startswith("usage: flower-supernode")
