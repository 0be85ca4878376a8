"""``splitvault up --deploy DIR``: both tiers on loopback for local development, until Ctrl-C."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from splitvault.launcher import TierProcess, start_tier, wait_for

LOOPBACK = "127.0.0.1"


def run_up(deploy: Path, port: int) -> int:
    """Start the private tier, then the public one on ``LOOPBACK:port``; stop both when either
    exits, on Ctrl-C or on SIGTERM. Returns 1 when a tier stopped on its own."""
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as stack:
        private = start_tier(
            ["serve", "private", "--deploy", str(deploy), "--host", LOOPBACK, "--port", "0"],
            "private_tier_listening",
            env={"SPLITVAULT_PRIVATE_METRICS_PORT": "0"},
        )
        stack.callback(private.stop)
        public = start_tier(
            [
                *("serve", "public", "--deploy", str(deploy), "--host", LOOPBACK),
                *("--port", str(port), "--private", f"{LOOPBACK}:{private.port}"),
            ],
            "public_tier_listening",
            env={"SPLITVAULT_PUBLIC_METRICS_PORT": "0"},
        )
        stack.callback(public.stop)
        wait_for(lambda: _logged(public, "public_tier_ready"), what="public tier startup")
        _print_started(deploy, private, public)
        try:
            while private.process.poll() is None and public.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping both tiers")
            return 0
        for name, tier in (("private", private), ("public", public)):
            if tier.process.poll() is not None:
                print(f"the {name} tier stopped (exit {tier.process.returncode}); its last lines:")
                print("\n".join(tier.lines[-20:]))
        return 1


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _logged(tier: TierProcess, event: str) -> bool:
    return any(item.get("event") == event for item in tier.events())


def _print_started(deploy: Path, private: TierProcess, public: TierProcess) -> None:
    url = f"https://localhost:{public.port}"
    print(f"private tier: {LOOPBACK}:{private.port} (mutual TLS), metrics {private.metrics_url}")
    print(f"public tier:  {url}, metrics {public.metrics_url}")
    print(
        f"  models:     curl --cacert {deploy}/public/tls/ca.crt -H 'Authorization: Bearer KEY' "
        f"{url}/v2/models"
    )
    print(f"  a key:      splitvault keys create --deploy {deploy} --name dev")
    print(
        f"  health:     splitvault health public --deploy {deploy} --url {url} "
        f"--metrics-url {public.metrics_url}"
    )
    print("Ctrl-C stops both tiers.", flush=True)
