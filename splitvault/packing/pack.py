"""``splitvault pack``: split a model and write each stage into its tier's folder.

The front stage is written in plaintext under ``public/``; the back stage is serialized into
memory and encrypted there, so no plaintext copy of a back-stage weight ever touches the disk.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch.export import ExportedProgram
from tqdm import tqdm

from private_core.activation_profile import PROFILE_FILE as ACTIVATION_PROFILE_FILE
from private_core.activation_profile import build_profile as build_activation_profile
from private_core.activation_profile import channel_groups
from private_core.activation_profile import features_of as activation_features
from private_core.activation_profile import save_profile as save_activation_profile
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
    read_manifest,
    write_json,
)
from shared.pairing import pairing_id
from shared.tensor_codec import datatype_of, numpy_dtype
from splitvault.errors import PackError
from splitvault.packing.diagnose import check_model_name, check_split_name, check_top_level_names
from splitvault.packing.shares import check_private_share
from splitvault.packing.spec import BenignData, ModelSpec
from splitvault.packing.split import StagePair, export_model, split_program
from splitvault.packing.text import write_tokenizer
from splitvault.packing.watermark_key import key_drawer


@dataclass(frozen=True)
class PackResult:
    """Where the stages went and what each tier holds."""

    config: ModelConfig
    public: TierCount
    private: TierCount
    front_path: Path
    back_path: Path
    pairing_id: str = ""  # the same in both manifests: both tiers must serve this pack


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
    min_private_share: float | None = None,
) -> PackResult:
    """Trace ``spec``, cut it after ``split`` and write both stages (front plain, back encrypted).

    With ``min_private_share``, a cut that keeps less of the parameters private is refused
    before anything is written.
    """
    check_model_name(name)
    check_top_level_names(child for child, _module in spec.module.named_children())
    check_split_name(split, (path for path, _module in spec.module.named_modules()))
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
            min_private_share,
            spec.tokenizer,
            benign=spec.benign_data(),
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
    check_model_name(options.name)
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
    min_private_share: float | None = None  # refuse a cut keeping less private (None: any)
    tokenizer: Path | None = None  # a text model's tokenizer.json, copied to the public tier
    benign: BenignData | None = None  # labelled data bounding the watermark key's benign cost


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
    if options.min_private_share is not None:
        public, private = _count(pair.front), _count(pair.back)
        check_private_share(
            public.parameters, private.parameters, options.split, options.min_private_share
        )
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
    result = _write_stages(
        pair, config, options.value_ranges, layout, provider, steps, options.tokenizer
    )
    if config.task == "classification":  # issue 14: a key bounded in benign cost where it can be
        back_dir = result.back_path.parent
        ensure_watermark_key(back_dir, provider, key_drawer(pair, config, options.benign, back_dir))
    if options.reference_inputs is not None:
        outputs = _front_outputs(pair, options.reference_inputs)
        _write_reference_profile(pair, outputs, result.front_path.parent)
        _write_activation_profile(
            outputs, options.reference_inputs, config, result.back_path.parent, provider
        )
    return result


CHUNK = 256  # reference samples per front pass


def _default_watermark(options: PackOptions) -> WatermarkConfig | None:
    """Classifiers are watermarked unless the spec says otherwise (issue 14)."""
    if options.watermark is None and options.task == "classification":
        return WatermarkConfig()
    return options.watermark


def _front_outputs(pair: StagePair, inputs: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """The front stage's outputs on natural reference data, in chunks of ``CHUNK`` samples."""
    module = pair.front.module()
    count = len(next(iter(inputs.values())))
    chunks = []
    with torch.inference_mode():
        for start in range(0, count, CHUNK):
            args = [inputs[name][start : start + CHUNK] for name in pair.request_inputs]
            outputs = module(*args)
            chunks.append({n: t.numpy() for n, t in zip(pair.front_outputs, outputs, strict=True)})
    return chunks


def _write_reference_profile(
    pair: StagePair, outputs: list[dict[str, np.ndarray]], front_dir: Path
) -> None:
    """Profile natural data in front-activation space, for the extraction monitor."""
    from public_api.monitor import build_profile, features_of, save_profile

    specs = _tensor_specs(pair.front, "outputs", pair)
    features = [features_of(activations, specs) for activations in outputs]
    save_profile(build_profile(np.concatenate(features)), front_dir / REFERENCE_FILE)


def _write_activation_profile(
    outputs: list[dict[str, np.ndarray]],
    inputs: dict[str, torch.Tensor],
    config: ModelConfig,
    back_dir: Path,
    provider: KeyProvider,
) -> None:
    """Profile natural activations as the private tier receives them (the transport datatype,
    with the request inputs the back takes too, such as an attention mask), sealed under the
    KEK next to the back stage, for the private tier's activation monitor."""
    manifest = read_manifest(back_dir)
    wire = numpy_dtype(config.transport_datatype)
    sources = {spec.source: spec.name for spec in manifest.inputs}
    features = []
    for index, chunk in enumerate(outputs):  # the chunks of ``_front_outputs``
        received = {
            sources[f"front:{name}"]: array.astype(wire) if array.dtype.kind == "f" else array
            for name, array in chunk.items()
            if f"front:{name}" in sources
        }
        received.update(
            {
                sources[f"request:{name}"]: tensor[index * CHUNK : (index + 1) * CHUNK].numpy()
                for name, tensor in inputs.items()
                if f"request:{name}" in sources
            }
        )
        features.append(activation_features(received, manifest.inputs))
    save_activation_profile(
        build_activation_profile(
            np.concatenate(features), channels=channel_groups(manifest.inputs)
        ),
        back_dir / ACTIVATION_PROFILE_FILE,
        provider,
        model=config.name,
        back_sha256=manifest.sha256,
    )


def _write_stages(
    pair: StagePair,
    config: ModelConfig,
    value_ranges: dict[str, tuple[int, int]],
    layout: DeployLayout,
    provider: KeyProvider,
    steps: tqdm[Any],
    tokenizer: Path | None = None,
) -> PackResult:
    public, private = _count(pair.front), _count(pair.back)
    tiers: dict[Literal["public", "private"], TierCount] = {"public": public, "private": private}
    _check_labels(config, pair)
    steps.set_postfix_str("writing front")
    front_dir, back_dir = layout.public.model(config.name), layout.private.model(config.name)
    front_bytes = _serialize(pair.front)
    back_bytes = _serialize(pair.back)
    pairing = pairing_id(
        hashlib.sha256(front_bytes).hexdigest(), hashlib.sha256(back_bytes).hexdigest()
    )
    front_path = front_dir / FRONT_FILE
    with _atomic_open(front_path) as out:
        out.write(front_bytes)
    request_specs = _request_specs(pair, value_ranges)
    text = None if tokenizer is None else write_tokenizer(tokenizer, front_dir, request_specs)
    front_manifest = StageManifest(
        model=config.name,
        stage="front",
        file=FRONT_FILE,
        encrypted=False,
        sha256=hashlib.sha256(front_bytes).hexdigest(),
        inputs=request_specs,
        outputs=_tensor_specs(pair.front, "outputs", pair),
        tiers=tiers,
        torch_version=torch.__version__,
        forward_inputs=[b.name for b in pair.back_inputs if b.source.startswith("request:")],
        pairing_id=pairing,
        text=text,
    )
    # The public tier is not told how answers are watermarked.
    _write_model_files(front_dir, config.model_copy(update={"watermark": None}), front_manifest)
    steps.update()
    steps.set_postfix_str("encrypting back")
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
        pairing_id=pairing,
    )
    del back_bytes
    _write_model_files(back_dir, config, back_manifest)
    steps.update()
    return PackResult(config, public, private, front_path, back_path, pairing)


def ensure_watermark_key(
    back_dir: Path,
    provider: KeyProvider,
    draw: Callable[[], WatermarkKey] = WatermarkKey.generate,
) -> WatermarkKey:
    """The model's watermark key, created with ``draw`` (encrypted under the KEK) only if there
    is none.

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
    key = draw()
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
    if config.task != "classification":
        raise PackError(
            "labels were given for an embedding model",
            cause="only a classifier's answers carry labels",
            fix="drop the labels, or pack it as --task classification",
        )
    classes = _placeholder_vals(pair.back, "outputs")[0].shape[-1]
    if len(config.labels) != classes:
        raise PackError(
            f"{len(config.labels)} labels given for {classes} classes",
            cause=f"the model's output has {classes} classes (its last dimension)",
            fix=f"give exactly {classes} labels, one per line, in class-index order",
        )


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
