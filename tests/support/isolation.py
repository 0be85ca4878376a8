"""What keeps this test run on the machine: its own network namespace, the connect guard, both.

``scripts/test.sh``, when root, runs pytest under ``unshare --net`` with ``lo`` up and sets
``SPLITVAULT_TEST_NETNS=1``: no process the tests start (Python, gRPC's native core,
redis-server) has a route off the machine. The tests that need the host's network (a Docker
engine's published ports) run in a second pytest call with ``SPLITVAULT_TEST_NETNS=host``;
where no namespace can be made it sets ``guard`` (the connect guard alone).
"""

from __future__ import annotations

import os
from pathlib import Path

NETNS_ENV = "SPLITVAULT_TEST_NETNS"


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace (``/proc/self/net/dev``; unlike
    ``/sys/class/net`` it follows the namespace without a new sysfs mount)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def routes() -> list[str]:
    """The IPv4 routes of this namespace's main table, as ``/proc/self/net/route`` lists them."""
    return Path("/proc/self/net/route").read_text().splitlines()[1:]


def in_own_netns() -> bool:
    """True when scripts/test.sh put this run in a network namespace of its own."""
    return os.environ.get(NETNS_ENV) == "1"


def isolation() -> str:
    """One line for pytest's header."""
    if in_own_netns():
        return f"own network namespace (interfaces: {', '.join(interfaces())}) + connect guard"
    if os.environ.get(NETNS_ENV) == "host":
        return "host network (tests that need a Docker engine) + connect guard"
    if os.environ.get(NETNS_ENV) == "guard":
        return "connect guard only (scripts/test.sh could not make a network namespace)"
    return "connect guard only (run as root through scripts/test.sh for a namespace of its own)"


def isolation_problem() -> str | None:
    """Why this run must not start, or None."""
    if in_own_netns():
        others = [name for name in interfaces() if name != "lo"]
        if others or routes():
            return f"{NETNS_ENV}=1, yet this namespace has interfaces {others} or routes"
        return None
    if os.environ.get("CI") and os.geteuid() == 0 and NETNS_ENV not in os.environ:
        return (
            "CI runs as root: run the tests through scripts/test.sh, which isolates them in a "
            "network namespace of their own"
        )
    return None
