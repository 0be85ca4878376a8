"""Each model as both tiers hold it: ready, or why not; and a log line when the tiers disagree.

A model is served by its front stage here and its back stage in the private tier; it is ready
only when both are loaded and come from one ``pack`` (``shared/pairing.py``). ``ModelSet``
answers the model list, a model's readiness and the tier's readiness from the private tier's
``ModelStatus``, and logs ``model_sets_differ`` (and ``model_pairing_mismatch`` per model)
each time the comparison changes: at startup, on readiness probes, and after a request the
private tier refused as not ready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from public_api.front import FrontStage
from public_api.private_client import BackStatus, PrivateTierClient
from shared.errors import SplitVaultError
from shared.logs import get_logger
from shared.pairing import mismatch_reason

log = get_logger(__name__)

# Why a model is not ready, as a client may read it (never the private tier's own words).
NOT_IN_PRIVATE = "the private tier does not hold this model"
NOT_LOADED = "the private tier could not load this model"
MISMATCH = "its tiers hold different packs (restart both tiers)"
UNREACHABLE = "the private tier is unreachable"
STARTUP_RETRY_S = 1.0


@dataclass(frozen=True)
class ModelState:
    """One model the public tier holds: ready, or the client-safe reason it is not."""

    name: str
    ready: bool
    reason: str = ""


def compare(
    stages: Mapping[str, FrontStage], backs: Mapping[str, BackStatus]
) -> tuple[list[ModelState], dict[str, str]]:
    """The state of every front stage, and operator reasons for every model the tiers disagree
    on (private-only models included)."""
    states: list[ModelState] = []
    problems: dict[str, str] = {}
    for name, stage in sorted(stages.items()):
        state, problem = _state_of(name, stage, backs.get(name))
        states.append(state)
        if problem is not None:
            problems[name] = problem
    for name in sorted(set(backs) - set(stages)):
        problems[name] = "only in the private tier (no front stage here)"
    return states, problems


def _state_of(
    name: str, stage: FrontStage, back: BackStatus | None
) -> tuple[ModelState, str | None]:
    if back is None:
        return ModelState(name, False, NOT_IN_PRIVATE), "only in the public tier"
    if not back.ready:
        return ModelState(name, False, NOT_LOADED), f"not loaded in the private tier: {back.reason}"
    mismatch = mismatch_reason(name, stage.manifest.pairing_id, back.pairing_id or None)
    if mismatch is not None:
        return ModelState(name, False, MISMATCH), mismatch
    return ModelState(name, True), None


class ModelSet:
    """Compares this tier's front stages with the private tier's back stages."""

    def __init__(self, stages: Mapping[str, FrontStage], private: PrivateTierClient) -> None:
        self._stages = stages
        self._private = private
        self._logged: dict[str, str] | None = None
        self._refresh: asyncio.Task[None] | None = None

    async def states(self) -> list[ModelState]:
        """Every model this tier holds, as the private tier now reports its half."""
        try:
            backs = await self._private.model_status()
        except SplitVaultError:
            return [ModelState(name, False, UNREACHABLE) for name in sorted(self._stages)]
        states, problems = compare(self._stages, backs)
        self._log_change(states, problems)
        return states

    async def state(self, model: str) -> ModelState:
        """One model's state (the caller checked that this tier holds it)."""
        return next(state for state in await self.states() if state.name == model)

    def refresh_soon(self) -> None:
        """Compare again in the background (after the private tier refused a model)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._compare())

    async def check_at_startup(self) -> None:
        """Compare once the private tier answers (it may start after this tier)."""
        while True:
            try:
                backs = await self._private.model_status()
            except SplitVaultError:
                await asyncio.sleep(STARTUP_RETRY_S)
                continue
            self._log_change(*compare(self._stages, backs))
            return

    async def _compare(self) -> None:
        await self.states()

    def _log_change(self, states: list[ModelState], problems: dict[str, str]) -> None:
        """Log the disagreements when they differ from the last ones logged."""
        if problems == self._logged:
            return
        previous, self._logged = self._logged or {}, problems
        for state in states:
            reason = problems.get(state.name)
            if (
                state.reason == MISMATCH
                and reason is not None
                and previous.get(state.name) != reason
            ):
                log.error("model_pairing_mismatch", model=state.name, reason=reason)
        if problems:
            log.warning("model_sets_differ", models=problems)
        elif previous:
            log.info("model_sets_agree", models=sorted(self._stages))
