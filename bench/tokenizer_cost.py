"""Text in: the tokenizer's cost per request against the front stage it feeds (MiniLM).

Measures, in process, what the public tier adds to a request when a text model takes text:
checking the sentences (``sentences_of``) and tokenizing them (``TextEncoder.encode``, the
``tokenizers`` Rust library), against running MiniLM's front stage (embeddings and the first
two encoder layers) on the token arrays that come out. It packs MiniLM into a temporary
deployment (about a minute) unless ``--deploy`` names one that holds it.

    python -m bench.tokenizer_cost [--batch 1 8 32] [--repeat 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from public_api.front import FrontStage, load_front_stages
from public_api.text import TextEncoder, load_text_encoders, sentences_of
from public_api.v2 import RequestInput
from shared.layout import TierDir

WORDS = [
    "split",
    "inference",
    "keeps",
    "the",
    "back",
    "layers",
    "of",
    "a",
    "model",
    "on",
    "a",
    "private",
    "server",
]
# Sentence lengths in words (MiniLM: about 1.2 tokens a word); the last is truncated at 512.
LENGTHS = {"short": 10, "medium": 100, "long": 1000}


def timed(run: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` runs (after one warm-up)."""
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tokenize(encoder: TextEncoder, item: RequestInput, limit: int) -> dict[str, Any]:
    """What the public tier does with a text input before the front stage."""
    return encoder.encode(sentences_of(item, None, limit)).arrays


def run_front(stage: FrontStage, arrays: dict[str, Any]) -> Any:
    """The front stage on token arrays, as ``public_api.front`` runs it."""
    args = [torch.from_numpy(arrays[spec.name]) for spec in stage.manifest.inputs]
    with torch.inference_mode():
        return stage.module(*args)


def packed_minilm(workdir: Path) -> Path:
    """A deployment holding MiniLM packed with its tokenizer."""
    from shared.keys import LocalFileKeyProvider
    from shared.manifest import RoundingPolicy
    from splitvault.demo import minilm
    from splitvault.deploy import init_deployment
    from splitvault.packing.pack import pack_spec

    layout = init_deployment(workdir / "deploy")
    provider = LocalFileKeyProvider.load(layout.kek)
    pack_spec(
        minilm.factory(),
        name="minilm",
        split=minilm.SPLIT,
        layout=layout,
        provider=provider,
        policy=RoundingPolicy(decimals=5),
        show_progress=False,
    )
    return layout.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tier's)")
    parser.add_argument("--deploy", type=Path, help="a deployment holding minilm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.deploy or packed_minilm(Path(scratch))
        tier = TierDir(root / "public")
        stage = load_front_stages(tier)["minilm"]
        encoder = load_text_encoders(tier.models, {"minilm": stage.manifest})["minilm"]
        limit = stage.config.max_batch_size
        print(f"torch threads {args.threads}; median of {args.repeat}")
        print("batch | sentence | tokens/sentence | tokenize ms | front ms | tokenize/front")
        for batch in args.batch:
            for kind, words in LENGTHS.items():
                sentence = " ".join(WORDS[i % len(WORDS)] for i in range(words))
                item = RequestInput(name="text", shape=[batch], datatype="BYTES")
                item.data = [sentence] * batch
                arrays = tokenize(encoder, item, limit)
                text = timed(functools.partial(tokenize, encoder, item, limit), args.repeat)
                front = timed(functools.partial(run_front, stage, arrays), args.repeat)
                print(
                    f"{batch} | {kind} | {arrays['input_ids'].shape[1]} | {text * 1000:.3f} | "
                    f"{front * 1000:.2f} | {text / front:.2%}"
                )


if __name__ == "__main__":
    main()
