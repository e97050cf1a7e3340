"""Flower's SuperNode, started with a shorter wait after an empty pull.

Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none, sleeps a fixed 3 s
before asking again. Every step of a cdcca round (status, uplink, apply) is one message, so a step waited
up to 3 s before the device even saw it: on a tiny 2-device fleet a round took 20.9 s with that wait and
17.5 s with 0.5 s (``benchmarks/fleet_message_steps.py``).
This launcher runs the stock ``flower-supernode`` with only that idle wait shortened to
``CDCCA_NODE_IDLE_S`` seconds (default :data:`IDLE_S`); an empty pull is one small request to the
SuperLink (in the live runs a SuperNode used 2.7 % of a core at 0.5 s, 2.3 % at 3 s). Every other wait of the SuperNode is left as Flower wrote it.

    python -m cdcca.fleet.supernode --superlink HOST:PORT ...   (the arguments of flower-supernode)
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

from cdcca.fleet.processes import flower_bin
from cdcca.fleet.warm_start import start_warm_parent

FLOWER_IDLE_S = 3.0       # the SuperNode's wait after an empty pull (flwr 1.42, start_client_internal)
IDLE_S = 0.5              # ours
IDLE_ENV = "CDCCA_NODE_IDLE_S"
WARM_ENV = "CDCCA_WARM_CLIENTAPPS"


class IdleClock:
    """The ``time`` module as the SuperNode's pull loop sees it: its idle wait is ``idle_s``, all else is time's."""

    def __init__(self, idle_s: float):
        if not idle_s > 0:
            raise ValueError(f"{IDLE_ENV} must be a number of seconds > 0, got {idle_s!r}")
        self.idle_s = idle_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == FLOWER_IDLE_S else seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def shorten_idle_wait(loop: ModuleType, idle_s: float) -> None:
    """Give the SuperNode's pull loop (``flwr.supernode.start_client_internal``) the idle wait ``idle_s``."""
    if getattr(loop, "time", None) is not time and not isinstance(getattr(loop, "time", None), IdleClock):
        raise RuntimeError(f"{loop.__name__} no longer imports `time` as its clock; this launcher was written for "
                           "flwr==1.42.0 — install that version, or start `flower-supernode` directly")
    loop.time = IdleClock(idle_s)  # type: ignore[attr-defined]


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    raw = os.environ.get(IDLE_ENV, str(IDLE_S))
    try:
        shorten_idle_wait(start_client_internal, float(raw))
    except ValueError:
        sys.exit(f"{IDLE_ENV} must be a number of seconds > 0, got {raw!r}")
    except RuntimeError as exc:
        sys.exit(str(exc))
    if os.environ.get(WARM_ENV, "1") != "0":
        os.environ.update(start_warm_parent(flower_bin("flwr-clientapp")))
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
