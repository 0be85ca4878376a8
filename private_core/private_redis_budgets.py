"""Admission budgets shared by every private replica, decided inside the private tier's Redis.

The same budgets as ``private_core.admission`` (rate and daily budget in samples per identity,
unsigned traffic and key), but counted once for all replicas: one Lua script
(``shared.gcra_redis``, Redis's own clock) decides every budget of a call and writes only if
all admit, so two replicas together admit exactly a budget, never twice it. Refusals, their
metric and alert are ``Admission``'s. A store that cannot answer refuses the call (fail closed).
"""

from __future__ import annotations

import asyncio

import redis.asyncio

from private_core.admission import Admission, Caller
from private_core.private_redis import STORE_FAILURES, StoreHealth
from shared.gcra_redis import GCRA_SCRIPT, decisions, script_call


class RedisBudgets:
    """``Admission``'s budgets, counted in the private store (``admit`` awaits it)."""

    def __init__(
        self,
        admission: Admission,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        timeout_s: float,
        health: StoreHealth,
    ) -> None:
        self.admission = admission
        self._client = client
        self._script = client.register_script(GCRA_SCRIPT)
        self._prefix = f"{prefix}admission:"
        self._timeout_s = timeout_s
        self._health = health

    async def admit(self, caller: Caller, model: str, samples: int) -> None:
        """Count ``samples`` rows for ``caller`` in the store, or raise without counting any
        (a budget's refusal, or ``Unavailable`` when the store cannot answer)."""
        checks = self.admission.checks(caller, model)
        keys, args = script_call(
            self._prefix, [(subject, policy) for _, subject, policy in checks], samples
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=args)
        except STORE_FAILURES as error:
            raise self._health.down(error) from None
        self._health.up()
        self.admission.settle(caller, model, samples, checks, decisions(reply, len(checks)))

    def start(self) -> None:
        """Nothing to do: every decision is written when it is made."""

    async def close(self) -> None:
        """Close the store's connections."""
        await self._client.aclose()
