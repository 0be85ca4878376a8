"""Which requests of a stage may share a batch, and how their inputs are put together and their
outputs cut apart again; both tiers' batchers use it (front stages and back stages).

Requests share a batch when their non-batch shapes are equal, or when they differ only along
dimensions that *pad exactly*: at startup a probe runs one sample alone and zero-padded next to
a longer one, and pads that dimension (to the longest in the batch) only if the answers agree.
MiniLM's sequence dimension passes (padded positions are masked out of attention, and of the
mean pooling); a stage that would change its answer is batched by identical shapes instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.logs import get_logger
from shared.manifest import BATCH_DIM, DimSpec, StageManifest, TensorSpec
from shared.tensor_codec import numpy_dtype

log = get_logger(__name__)
# A stage's raw outputs (in manifest order) for assembled inputs.
Forward = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class BatchPlan:
    """How a stage's requests share batches."""

    batchable: bool  # every input and output leads with the ``batch`` dim
    padded: frozenset[str] = frozenset()  # dims padded to the longest in a batch

    def key(self, specs: Sequence[TensorSpec], arrays: Mapping[str, Any]) -> Hashable | None:
        """Requests with equal keys may share a batch; None: this request runs alone."""
        if not self.batchable:
            return None
        return tuple(
            tuple(
                -1 if isinstance(dim, DimSpec) and dim.name in self.padded else size
                for dim, size in zip(spec.shape[1:], arrays[spec.name].shape[1:], strict=True)
            )
            for spec in specs
        )


def assemble(manifest: StageManifest, parts: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Each input of all requests' arrays (``parts``) in one buffer of the stage's dtype: the
    only copy made. Rows follow request order; along padded dims shorter requests are
    zero-filled."""
    args = []
    for spec in manifest.inputs:
        arrays = [part[spec.name] for part in parts]
        dtype = numpy_dtype(spec.datatype)
        if len(arrays) == 1:  # cast or copy once: torch needs a writable array of its dtype
            args.append(torch.from_numpy(np.array(arrays[0], dtype=dtype)))
            continue
        tail = tuple(max(a.shape[axis] for a in arrays) for axis in range(1, arrays[0].ndim))
        if all(a.shape[1:] == tail for a in arrays):  # one call: half the CPU of a copy each
            args.append(torch.from_numpy(np.concatenate(arrays, dtype=dtype, casting="unsafe")))
            continue
        buffer = np.zeros((sum(map(len, arrays)), *tail), dtype=dtype)
        start = 0
        for array in arrays:
            buffer[(slice(start, start + len(array)), *map(slice, array.shape[1:]))] = array
            start += len(array)
        args.append(torch.from_numpy(buffer))
    return args


def unpad(
    rows: torch.Tensor, spec: TensorSpec, plan: BatchPlan, sizes: Mapping[str, int]
) -> torch.Tensor:
    """Cut one request's rows of output ``spec`` back to its own sizes along padded dims."""
    if not plan.padded:
        return rows
    index = tuple(
        slice(sizes[dim.name])
        if isinstance(dim, DimSpec) and dim.name in plan.padded
        else slice(None)
        for dim in spec.shape
    )
    return rows[index]


def plan_batching(manifest: StageManifest, forward: Forward, *, name: str, pad: bool) -> BatchPlan:
    """Whether a stage batches, and along which dims its requests may be zero-padded."""
    specs = [*manifest.inputs, *manifest.outputs]
    if not all(
        spec.shape and isinstance(spec.shape[0], DimSpec) and spec.shape[0].name == BATCH_DIM
        for spec in specs
    ):
        return BatchPlan(batchable=False)
    dims = {
        dim.name: dim
        for spec in manifest.inputs
        for dim in spec.shape[1:]
        if isinstance(dim, DimSpec) and dim.max > dim.min
    }
    if not pad or not dims or not _zero_allowed(manifest.inputs):
        return BatchPlan(batchable=True)
    if _padding_is_exact(manifest, forward, dims, name):
        return BatchPlan(batchable=True, padded=frozenset(dims))
    log.info("batch_padding_refused", model=name, dims=sorted(dims))
    return BatchPlan(batchable=True)


def _zero_allowed(specs: Sequence[TensorSpec]) -> bool:
    return all(spec.value_range is None or spec.value_range[0] <= 0 for spec in specs)


def _padding_is_exact(
    manifest: StageManifest, forward: Forward, dims: Mapping[str, DimSpec], name: str
) -> bool:
    """Run a sample alone and zero-padded in a batch with a longer one; compare its answers."""
    short = {dim: min(max(spec.min, 4), spec.max - 1) for dim, spec in dims.items()}
    long = {dim: min(dims[dim].max, size + 3) for dim, size in short.items()}
    rng = np.random.default_rng(0)
    sample, longer = probe(manifest, short, rng), probe(manifest, long, rng)
    plan = BatchPlan(batchable=True, padded=frozenset(dims))
    try:
        alone = forward(assemble(manifest, [sample]))
        together = forward(assemble(manifest, [sample, longer]))
    except Exception as error:  # a stage that cannot take the padded shape is not padded
        log.info("batch_padding_probe_failed", model=name, error=type(error).__name__)
        return False
    sizes = {**short, BATCH_DIM: 1}
    for spec, single, batched in zip(manifest.outputs, alone, together, strict=True):
        padded = unpad(batched[:1], spec, plan, sizes)
        if single.shape != padded.shape or not torch.allclose(
            single.double(), padded.double(), rtol=1e-4, atol=1e-5
        ):
            return False
    return True


def probe(
    manifest: StageManifest, sizes: Mapping[str, int], rng: np.random.Generator
) -> dict[str, Any]:
    """One row of inputs: random floats, integers at the top of their range (a mask of ones)."""
    arrays = {}
    for spec in manifest.inputs:
        shape = (1, *(sizes[d.name] if isinstance(d, DimSpec) else d for d in spec.shape[1:]))
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            high = spec.value_range[1] if spec.value_range is not None else 1
            arrays[spec.name] = np.full(shape, high, dtype=dtype)
    return arrays
