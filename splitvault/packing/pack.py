"""``splitvault pack``: split a model and write each stage into its tier's folder.

The front stage is written in plaintext under ``public/``; the back stage is serialized into
memory and encrypted there, so no plaintext copy of a back-stage weight ever touches the disk.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch.export import ExportedProgram
from tqdm import tqdm

from private_core.watermark.keys import (
    WATERMARK_KEY_FILE,
    WatermarkKey,
    WatermarkKeyError,
    load_key,
    save_key,
)
from shared.crypto import DecryptionError, encrypt_stream
from shared.keys import KeyProvider
from shared.layout import BACK_FILE, FRONT_FILE, REFERENCE_FILE, DeployLayout
from shared.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    DimSpec,
    ModelConfig,
    OutputPolicy,
    StageManifest,
    TensorSpec,
    TierCount,
    WatermarkConfig,
    write_json,
)
from shared.tensor_codec import datatype_of
from splitvault.packing.spec import ModelSpec
from splitvault.packing.split import StagePair, export_model, split_program


@dataclass(frozen=True)
class PackResult:
    """Where the stages went and what each tier holds."""

    config: ModelConfig
    public: TierCount
    private: TierCount
    front_path: Path
    back_path: Path


def pack_spec(
    spec: ModelSpec,
    *,
    name: str,
    split: str,
    layout: DeployLayout,
    provider: KeyProvider,
    policy: OutputPolicy,
    transport_datatype: str = "FP16",
    max_batch_size: int = 64,
    show_progress: bool = True,
    watermark: WatermarkConfig | None = None,
) -> PackResult:
    """Trace ``spec``, cut it after ``split`` and write both stages (front plain, back encrypted)."""
    if split not in dict(spec.module.named_modules()):
        raise ValueError(f"the model has no submodule {split!r}")
    with tqdm(total=4, desc=f"pack {name}", unit="step", disable=not show_progress) as steps:
        steps.set_postfix_str("tracing")
        program = export_model(spec)
        steps.update()
        options = PackOptions(
            name,
            split,
            spec.task,
            policy,
            transport_datatype,
            max_batch_size,
            spec.labels,
            spec.value_ranges,
            spec.reference_inputs,
            watermark,
        )
        return _split_and_write(program, options, spec.dynamic_dims, layout, provider, steps)


def pack_program(
    program: ExportedProgram,
    options: PackOptions,
    *,
    layout: DeployLayout,
    provider: KeyProvider,
    show_progress: bool = True,
) -> PackResult:
    """Split a saved ``torch.export`` program (it must carry its example inputs)."""
    with tqdm(
        total=4, desc=f"pack {options.name}", unit="step", disable=not show_progress
    ) as steps:
        steps.update()
        return _split_and_write(program, options, None, layout, provider, steps)


@dataclass(frozen=True)
class PackOptions:
    """What the model config records besides the graph."""

    name: str
    split: str
    task: str
    policy: OutputPolicy
    transport_datatype: str = "FP16"
    max_batch_size: int = 64
    labels: list[str] | None = None
    value_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    reference_inputs: dict[str, torch.Tensor] | None = None
    watermark: WatermarkConfig | None = None


def _split_and_write(
    program: ExportedProgram,
    options: PackOptions,
    dim_names: dict[str, dict[int, str]] | None,
    layout: DeployLayout,
    provider: KeyProvider,
    steps: tqdm[Any],
) -> PackResult:
    steps.set_postfix_str("splitting")
    pair = split_program(program, options.split, dim_names)
    steps.update()
    config = ModelConfig.model_validate(
        {
            "name": options.name,
            "split": options.split,
            "task": options.task,
            "policy": options.policy,
            "transport_datatype": options.transport_datatype,
            "labels": options.labels,
            "max_batch_size": options.max_batch_size,
            "watermark": _default_watermark(options),
        }
    )
    result = _write_stages(pair, config, options.value_ranges, layout, provider, steps)
    if options.reference_inputs is not None:
        _write_reference_profile(pair, options.reference_inputs, result.front_path.parent)
    return result


def _default_watermark(options: PackOptions) -> WatermarkConfig | None:
    """Classifiers are watermarked unless the spec says otherwise (issue 14)."""
    if options.watermark is None and options.task == "classification":
        return WatermarkConfig()
    return options.watermark


def _write_reference_profile(
    pair: StagePair, inputs: dict[str, torch.Tensor], front_dir: Path
) -> None:
    """Profile natural data in front-activation space, for the extraction monitor."""
    from public_api.monitor import build_profile, features_of, save_profile

    module = pair.front.module()
    count = len(next(iter(inputs.values())))
    features = []
    with torch.inference_mode():
        for start in range(0, count, 256):
            args = [inputs[name][start : start + 256] for name in pair.request_inputs]
            outputs = module(*args)
            activations = {n: t.numpy() for n, t in zip(pair.front_outputs, outputs, strict=True)}
            features.append(features_of(activations, _tensor_specs(pair.front, "outputs", pair)))
    save_profile(build_profile(np.concatenate(features)), front_dir / REFERENCE_FILE)


def _write_stages(
    pair: StagePair,
    config: ModelConfig,
    value_ranges: dict[str, tuple[int, int]],
    layout: DeployLayout,
    provider: KeyProvider,
    steps: tqdm[Any],
) -> PackResult:
    public, private = _count(pair.front), _count(pair.back)
    tiers: dict[Literal["public", "private"], TierCount] = {"public": public, "private": private}
    _check_labels(config, pair)
    steps.set_postfix_str("writing front")
    front_dir, back_dir = layout.public.model(config.name), layout.private.model(config.name)
    front_bytes = _serialize(pair.front)
    front_path = front_dir / FRONT_FILE
    with _atomic_open(front_path) as out:
        out.write(front_bytes)
    front_manifest = StageManifest(
        model=config.name,
        stage="front",
        file=FRONT_FILE,
        encrypted=False,
        sha256=hashlib.sha256(front_bytes).hexdigest(),
        inputs=_request_specs(pair, value_ranges),
        outputs=_tensor_specs(pair.front, "outputs", pair),
        tiers=tiers,
        torch_version=torch.__version__,
        forward_inputs=[b.name for b in pair.back_inputs if b.source.startswith("request:")],
    )
    # The public tier is not told how answers are watermarked.
    _write_model_files(front_dir, config.model_copy(update={"watermark": None}), front_manifest)
    steps.update()
    steps.set_postfix_str("encrypting back")
    back_bytes = _serialize(pair.back)
    back_path = back_dir / BACK_FILE
    bar = tqdm(
        total=len(back_bytes),
        desc="encrypt",
        unit="B",
        unit_scale=True,
        disable=steps.disable,
        leave=False,
    )
    with bar, _atomic_open(back_path) as out:
        encrypt_stream(back_bytes, out, provider, progress=bar.update)
    back_manifest = StageManifest(
        model=config.name,
        stage="back",
        file=BACK_FILE,
        encrypted=True,
        sha256=hashlib.sha256(back_bytes).hexdigest(),
        inputs=_back_input_specs(pair),
        outputs=_tensor_specs(pair.back, "outputs", pair),
        tiers=tiers,
        torch_version=torch.__version__,
    )
    del back_bytes
    if config.task == "classification":
        ensure_watermark_key(back_dir, provider)
    _write_model_files(back_dir, config, back_manifest)
    steps.update()
    return PackResult(config, public, private, front_path, back_path)


def ensure_watermark_key(back_dir: Path, provider: KeyProvider) -> WatermarkKey:
    """The model's watermark key, created (encrypted under the KEK) only if there is none.

    A repack keeps the key, so copies made from earlier answers stay provable.
    """
    path = back_dir / WATERMARK_KEY_FILE
    if path.exists():
        try:
            return load_key(path, provider)
        except (WatermarkKeyError, DecryptionError):
            raise ValueError(
                f"{path} exists but does not decrypt under this KEK; move it away to make a new key"
            ) from None
    key = WatermarkKey.generate()
    save_key(key, path, provider)
    return key


def _serialize(program: ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@contextmanager
def _atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Write to a sibling temporary file, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _write_model_files(model_dir: Path, config: ModelConfig, manifest: StageManifest) -> None:
    write_json(model_dir / CONFIG_FILE, config)
    write_json(model_dir / MANIFEST_FILE, manifest)


def _count(program: ExportedProgram) -> TierCount:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    real = [t for t in tensors if isinstance(t, torch.Tensor)]
    return TierCount(
        parameters=sum(t.numel() for t in real),
        bytes=sum(t.numel() * t.element_size() for t in real),
    )


def _check_labels(config: ModelConfig, pair: StagePair) -> None:
    if config.labels is None:
        return
    classes = _placeholder_vals(pair.back, "outputs")[0].shape[-1]
    if len(config.labels) != classes:
        raise ValueError(f"{len(config.labels)} labels given for {classes} classes")


def _placeholder_vals(program: ExportedProgram, which: str) -> list[Any]:
    graph = program.graph
    if which == "outputs":
        output = next(n for n in graph.nodes if n.op == "output")
        return [n.meta["val"] for n in output.args[0]]
    users = set(program.graph_signature.user_inputs)
    return [n.meta["val"] for n in graph.nodes if n.op == "placeholder" and n.name in users]


def _shape_spec(val: Any, dims: dict[str, tuple[str, int, int]]) -> list[int | DimSpec]:
    shape: list[int | DimSpec] = []
    for dim in val.shape:
        if isinstance(dim, torch.SymInt):
            if str(dim) not in dims:
                raise ValueError(f"a stage tensor has a size {dim} not derived from an input")
            dim_name, low, high = dims[str(dim)]
            shape.append(DimSpec(name=dim_name, min=low, max=high))
        else:
            shape.append(int(dim))
    return shape


def _tensor_specs(program: ExportedProgram, which: str, pair: StagePair) -> list[TensorSpec]:
    names = pair.front_outputs if program is pair.front else ["output"]
    dims = pair.front_dims if program is pair.front else pair.back_dims
    vals = _placeholder_vals(program, which)
    return [
        TensorSpec(name=n, datatype=datatype_of(_numpy_dtype(v)), shape=_shape_spec(v, dims))
        for n, v in zip(names, vals, strict=True)
    ]


def _request_specs(pair: StagePair, value_ranges: dict[str, tuple[int, int]]) -> list[TensorSpec]:
    vals = _placeholder_vals(pair.front, "inputs")
    return [
        TensorSpec(
            name=name,
            datatype=datatype_of(_numpy_dtype(val)),
            shape=_shape_spec(val, pair.front_dims),
            value_range=value_ranges.get(name),
        )
        for name, val in zip(pair.request_inputs, vals, strict=True)
    ]


def _back_input_specs(pair: StagePair) -> list[TensorSpec]:
    vals = _placeholder_vals(pair.back, "inputs")
    return [
        TensorSpec(
            name=b.name,
            datatype=datatype_of(_numpy_dtype(v)),
            shape=_shape_spec(v, pair.back_dims),
            source=b.source,
        )
        for b, v in zip(pair.back_inputs, vals, strict=True)
    ]


def _numpy_dtype(val: Any) -> Any:
    return torch.empty((), dtype=val.dtype).numpy().dtype
