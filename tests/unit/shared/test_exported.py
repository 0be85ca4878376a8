"""A served stage skips torch.export's per-call input check; the manifest check that both
tiers run first refuses what that check would have refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import InvalidInput
from shared.exported import serving_module
from shared.manifest import read_manifest
from shared.validation import check_tensors
from tests.conftest import Deployment


@pytest.mark.parametrize("shape", [(1, 1, 9, 8), (1, 2, 8, 8), (1, 8, 8), (1025, 1, 8, 8)], ids=str)
def test_inputs_torch_would_refuse_are_refused_by_the_manifest_check(
    deployment: Deployment, shape: tuple[int, ...]
) -> None:
    folder = deployment.layout.public.model("digits")
    program = torch.export.load(folder / read_manifest(folder).file)
    served, checked = serving_module(program), program.module()
    image = np.zeros(shape, np.float32)
    with pytest.raises(Exception):  # noqa: B017, PT011 - torch's own error types vary
        checked(torch.from_numpy(image))
    with pytest.raises(InvalidInput):
        check_tensors(read_manifest(folder).inputs, {"image": image})
    good = torch.zeros(2, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(served(good), checked(good), atol=0, rtol=0)
