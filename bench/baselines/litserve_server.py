"""Baseline: the unsplit model served by LitServe with its dynamic batching on.

One ``LitAPI`` per model (each runs in its own inference worker process): requests are
gathered up to ``--max-batch-size`` or ``--batch-timeout`` seconds, stacked, run as one
forward and split back. One API server process, as splitvault's public tier is one process.

    python bench/baselines/litserve_server.py --port 8001 --digits-state digits.pt --minilm \
        --threads 2 --max-batch-size 32 --batch-timeout 0.005 --certfile c.crt --keyfile c.key
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
from collections.abc import Sequence
from typing import Any

import litserve as ls
import torch

from bench.baselines.common import ServedModel, concat_batch, load_models, tensors_from_body


class ModelAPI(ls.LitAPI):  # type: ignore[misc] # litserve ships no type information
    """One unsplit model; ``setup`` runs in the inference worker process."""

    def __init__(
        self, name: str, digits_state: Path | None, threads: int, batch: int, timeout: float
    ) -> None:
        super().__init__(
            max_batch_size=batch, batch_timeout=timeout, api_path=f"/v2/models/{name}/infer"
        )
        self.model_name = name
        self.digits_state = digits_state
        self.threads = threads
        self.model: ServedModel | None = None
        self.sizes: list[int] = []

    def setup(self, device: str) -> None:
        """Load the model (CPU) with the thread budget."""
        minilm = self.model_name == "minilm"
        state = None if minilm else self.digits_state
        self.model = load_models(state, minilm, self.threads)[self.model_name]

    # LitServe reads these two signatures: an unannotated ``request`` makes it parse the body
    # as JSON itself (its default path) and no return annotation adds no response model.
    def decode_request(self, request, **kwargs):  # type: ignore[no-untyped-def]
        """The request's tensors (``request`` is the parsed JSON body)."""
        return tensors_from_body(request)

    def batch(self, inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack the requests; remember how many samples each brought."""
        self.sizes = [len(next(iter(tensors.values()))) for tensors in inputs]
        return concat_batch(inputs)

    def predict(self, x: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """One forward for the whole batch."""
        if self.model is None:
            raise RuntimeError("setup() has not run")
        return self.model.forward(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        """One output slice per request."""
        return list(torch.split(output, self.sizes))

    def encode_response(self, output, **kwargs):  # type: ignore[no-untyped-def]
        """The answer as JSON."""
        if self.model is None:
            raise RuntimeError("setup() has not run")
        return self.model.answer(output)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description="LitServe baseline server")
    parser.add_argument("--port", type=int, required=True, help="1024-65535 (LitServe's rule)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--digits-state", type=Path, help="state dict of the digits CNN")
    parser.add_argument("--minilm", action="store_true", help="serve all-MiniLM-L6-v2")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--api-servers", type=int, default=1, help="HTTP server processes")
    parser.add_argument("--timeout", type=float, default=30.0, help="request timeout, seconds")
    parser.add_argument("--certfile", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--keyfile", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build one LitAPI per model and serve until SIGTERM."""
    args = parse_args(argv)
    names = (["digits"] if args.digits_state else []) + (["minilm"] if args.minilm else [])
    if not names:
        raise SystemExit("nothing to serve: give --digits-state and/or --minilm")
    apis = [
        ModelAPI(name, args.digits_state, args.threads, args.max_batch_size, args.batch_timeout)
        for name in names
    ]
    tls: dict[str, Any] = {}
    if args.certfile is not None:
        tls = {"ssl_certfile": str(args.certfile), "ssl_keyfile": str(args.keyfile)}
    server = ls.LitServer(apis, accelerator="cpu", timeout=args.timeout)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level="warning",
        **tls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
