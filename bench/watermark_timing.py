"""The watermark's timing side channel, measured as an attacker would through the public API.

The digits model is packed with the label watermark (top-3 policy) and served by both tiers
with their defaults (dynamic batching on; sealing on, with an owner key). The owner's
verifier picks ``--marked`` queries the watermark marks and as many it does not; each is sent
``--repeats`` times, alone in its request, in one shuffled order, and timed end to end. For
each query the attacker's statistics of its times (median, minimum, mean) separate marked from
unmarked as well as the AUC of that statistic says (0.5: not at all; the figure reported is
max(AUC, 1 - AUC), since an attacker may read either direction). The issue's bound: <= 0.55.

The watermark settings (``--fraction 0.5 --max-confidence 1`` by default) only decide how many
candidate queries are marked; which rows are marked changes no work in either tier.

    .venv/bin/python bench/watermark_timing.py                       # about 2 minutes on 2 cores
    .venv/bin/python bench/watermark_timing.py --marked 50 --repeats 10   # quicker
"""

# ruff: noqa: E402 - the repository root goes on sys.path before the project imports.
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse
import json
import ssl
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing

import httpx
import numpy as np

from public_api.keys import KEYS_DB, STATE_DIR, SqliteKeyStore
from public_api.terms import load_terms
from shared.keys import LocalFileKeyProvider
from shared.logs import configure_logging
from shared.manifest import TopKPolicy, WatermarkConfig
from splitvault.demo import digits
from splitvault.deploy import init_deployment
from splitvault.launcher import start_both
from splitvault.ownership.owner import OwnerModel
from splitvault.ownership.sealed import generate_owner_key
from splitvault.packing.pack import pack_spec

MODEL = "digits"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marked", type=int, default=200, help="marked (and unmarked) queries")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats of each query")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-confidence", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's value > a negative's), ties counting half (Mann-Whitney U / n m)."""
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def deploy(
    args: argparse.Namespace, workdir: Path, stack: ExitStack
) -> tuple[str, Path, str, OwnerModel]:
    """Pack, install an owner key, start both tiers; returns (URL, CA, API key, owner)."""
    data = digits.load_data()
    net = digits.train(data, epochs=8)
    layout = init_deployment(workdir / "d")
    watermark = WatermarkConfig(
        enabled=True, scheme="label", fraction=args.fraction, max_confidence=args.max_confidence
    )
    pack_spec(
        digits.spec_for(net, data),
        name=MODEL,
        split=digits.SPLIT,
        layout=layout,
        provider=LocalFileKeyProvider.load(layout.kek),
        policy=TopKPolicy(k=3),
        show_progress=False,
        watermark=watermark,
    )
    generate_owner_key(layout.root)
    with closing(SqliteKeyStore(layout.public.root / STATE_DIR / KEYS_DB)) as keys:
        key, secret = keys.create("timer", rate_per_s=1e6, burst=10**6, daily_quota=10**9)
        terms = load_terms(layout.public.root / "terms.md", "1")
        keys.record_acceptance(key.key_id, "1", terms.sha256, "127.0.0.1", time.time())
    env = {
        "SPLITVAULT_PRIVATE_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_TORCH_THREADS": "1",
        "SPLITVAULT_PUBLIC_PROTECTION__MONITOR_ACTION": "record",
        # The private activation monitor reads the noisy copies ``pick`` adds when natural
        # digits hold too few marked queries as a perturbation sweep and refuses the key (what
        # it is for); this benchmark measures the watermark's timing channel, so it records.
        "SPLITVAULT_PRIVATE_ACTIVATION_MONITOR__ACTION": "record",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__RATE_PER_S": "100000",
        "SPLITVAULT_PUBLIC_PROTECTION__IP_LIMITS__BURST": "100000",
    }
    public, _ = start_both(layout.root, stack, env=env)
    owner = OwnerModel(layout.root, MODEL)
    return f"https://localhost:{public.port}", layout.public.ca_cert, secret, owner


def pick(owner: OwnerModel, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` marked and ``count`` unmarked distinct queries (digits, then noisy copies)."""
    data = digits.load_data()
    pool = np.concatenate([data.train_x, data.test_x])
    rng = np.random.default_rng(seed)
    while True:
        candidates = owner.candidates({"image": pool}, owner.marker())
        selected = candidates.marks.selected
        if selected.sum() >= count and (~selected).sum() >= count:
            break
        noisy = pool + rng.normal(0, 0.3, pool.shape).astype(np.float32)
        pool = np.concatenate([pool, np.clip(noisy, 0, 16)])
    inputs = candidates.inputs["image"]
    marked = rng.permutation(np.flatnonzero(selected))[:count]
    unmarked = rng.permutation(np.flatnonzero(~selected))[:count]
    return inputs[marked], inputs[unmarked]


def time_queries(
    url: str, ca: Path, secret: str, queries: np.ndarray, repeats: int, seed: int
) -> np.ndarray:
    """Seconds of each (query, repeat), requests in one shuffled order on one connection."""
    bodies = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, *q.shape],
                        "datatype": "FP32",
                        "data": q.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        for q in queries
    ]
    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(queries)), repeats))
    times = np.zeros((len(queries), repeats))
    done = np.zeros(len(queries), dtype=int)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=url, verify=context, headers=headers, timeout=30) as client:
        for _ in range(20):  # warm the connection and both tiers
            client.post(f"/v2/models/{MODEL}/infer", content=bodies[0])
        for index in order:
            started = time.perf_counter()
            response = client.post(f"/v2/models/{MODEL}/infer", content=bodies[index])
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            times[index, done[index]] = elapsed
            done[index] += 1
    return times


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("WARNING", tier="bench")
    with tempfile.TemporaryDirectory() as workdir, ExitStack() as stack:
        url, ca, secret, owner = deploy(args, Path(workdir), stack)
        marked, unmarked = pick(owner, args.marked, args.seed)
        queries = np.concatenate([marked, unmarked])
        times = time_queries(url, ca, secret, queries, args.repeats, args.seed)
    n = len(marked)
    figures = {}
    for name, stat in (("median", np.median), ("min", np.min), ("mean", np.mean)):
        values = stat(times, axis=1)
        a = auc(values[:n], values[n:])
        figures[name] = {
            "auc": a,
            "separability": max(a, 1 - a),
            "marked_ms": float(np.median(values[:n]) * 1e3),
            "unmarked_ms": float(np.median(values[n:]) * 1e3),
        }
    print(f"{n} marked vs {n} unmarked queries, {args.repeats} timed repeats each, batching on")
    print(
        f"{'statistic':<10} {'AUC':>6} {'max(AUC,1-AUC)':>15} {'marked ms':>10} {'unmarked ms':>12}"
    )
    for name, f in figures.items():
        print(
            f"{name:<10} {f['auc']:>6.3f} {f['separability']:>15.3f} "
            f"{f['marked_ms']:>10.3f} {f['unmarked_ms']:>12.3f}"
        )
    worst = max(f["separability"] for f in figures.values())
    print(f"worst separability {worst:.3f} (bound 0.55): {'PASS' if worst <= 0.55 else 'FAIL'}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"queries": n, "repeats": args.repeats, **figures}, indent=2)
        )


if __name__ == "__main__":
    main()
