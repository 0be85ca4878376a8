"""Front stages: load the plaintext programs and run them off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from shared.layout import TierDir
from shared.logs import get_logger
from shared.manifest import ModelConfig, StageManifest, read_config, read_manifest
from shared.tensor_codec import numpy_dtype

log = get_logger(__name__)


@dataclass(frozen=True)
class FrontStage:
    """A loaded front stage with its config and manifest."""

    config: ModelConfig
    manifest: StageManifest
    module: torch.nn.Module


def load_front_stages(tier: TierDir) -> dict[str, FrontStage]:
    """Load every model under ``tier.models``; a broken one is logged and skipped."""
    stages: dict[str, FrontStage] = {}
    folders = sorted(p for p in tier.models.iterdir() if p.is_dir()) if tier.models.is_dir() else []
    for folder in folders:
        try:
            config, manifest = read_config(folder), read_manifest(folder)
            program = torch.export.load(folder / manifest.file)
        except Exception as error:  # one bad model must not stop the others
            log.error(
                "front_stage_load_failed",
                model=folder.name,
                error=type(error).__name__,
                detail=str(error)[:200],
            )
            continue
        stages[config.name] = FrontStage(config, manifest, program.module())
        log.info("front_stage_loaded", model=config.name)
    return stages


class FrontRunner:
    """Runs front stages in a thread pool and casts activations to the transport datatype."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor

    async def run(self, stage: FrontStage, inputs: dict[str, Any]) -> dict[str, Any]:
        """Front-stage activations by output name, as NumPy arrays ready to send."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _run_front, stage, inputs)


def _run_front(stage: FrontStage, inputs: dict[str, Any]) -> dict[str, Any]:
    args = [torch.from_numpy(inputs[spec.name]) for spec in stage.manifest.inputs]
    with torch.inference_mode():
        outputs = stage.module(*args)
    transport = numpy_dtype(stage.config.transport_datatype)
    result: dict[str, Any] = {}
    for spec, tensor in zip(stage.manifest.outputs, outputs, strict=True):
        array = tensor.numpy()
        # One cast (none when the transport is the stage dtype), then bytes for the wire.
        result[spec.name] = (
            array.astype(transport, copy=False) if array.dtype.kind == "f" else array
        )
    return result
