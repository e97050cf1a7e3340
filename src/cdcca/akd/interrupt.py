"""A round the cloud gives up: when a device reports a shift while a regular round trains, that round's
update would teach the domain the device just left, so the cloud stops it and starts the shift's round.

Training loops call :func:`check` once a step; a round stopped this way commits nothing (the cloud's
mirror, student state and pending uploads stay as they were before it)."""

from __future__ import annotations

from collections.abc import Callable

StopCheck = Callable[[], bool]


class RoundInterrupted(Exception):
    """Raised inside a round's training when its ``should_stop`` says so."""


def check(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise RoundInterrupted("the round was interrupted: a device reported a shift")
