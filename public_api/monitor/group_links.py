"""What links two API keys into one group: a shared address, /64, terms-acceptance address, or
a shared non-natural query distribution.

* Addresses: two keys served from the same address are linked ("address"); IPv6 keys from the
  same /64 (the subject of the per-address limits, ``limit_subject``) too ("/64"); a key whose
  terms were accepted from an address another key used ("terms").
* Distribution: only keys whose own queries look crafted (PRADA's W under its threshold, or an
  OOD share whose lower confidence bound exceeds ``ood_low``) are compared: natural traffic
  looks alike whoever sends it, so its likeness is no evidence. Two such keys are linked when
  their queries intermingle as if drawn from one source: Schilling's nearest-neighbour
  two-sample statistic on the PRADA reservoirs (per predicted class, the share of queries whose
  nearest other query belongs to the other key, over the share expected if both keys sampled
  one distribution): about 1 for one source, near 0 for two.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from public_api.addresses import limit_subject
from public_api.monitor.config import MonitorConfig
from public_api.monitor.signals import wilson_low
from public_api.monitor.state import ModelState

__all__ = ["Link", "address_links", "crafted", "distribution_links", "is_ip", "mixing"]


@dataclass(frozen=True)
class Link:
    """Evidence that keys ``a`` and ``b`` (``a < b``) are one client."""

    a: str
    b: str
    kind: str  # "address", "/64", "terms" or "distribution"
    detail: str

    def describe(self) -> str:
        """``a ~ b: kind detail``."""
        return f"{self.a} ~ {self.b}: {self.kind} {self.detail}"


def address_links(
    served: Mapping[str, Mapping[str, float]], terms: Mapping[str, set[str]], crowd: int
) -> tuple[list[Link], list[str]]:
    """Keys served from one address or /64, or accepting terms from an address another used.

    A subject shared by more than ``crowd`` keys (a proxy whose clients are not told apart, a
    carrier NAT) links none of them; such subjects are returned beside the links.
    """
    by_subject: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key_id, addresses in served.items():
        for address in filter(is_ip, addresses):
            by_subject[limit_subject(address)][key_id].add(address)
    by_terms: dict[str, set[str]] = defaultdict(set)
    for key_id, accepted in terms.items():
        for address in filter(is_ip, accepted):
            by_terms[limit_subject(address)].add(key_id)
    crowded = set(
        subject
        for subject in {*by_subject, *by_terms}
        if len(set(by_subject.get(subject, {})) | by_terms.get(subject, set())) > crowd
    )
    links: dict[tuple[str, str], Link] = {}
    for subject, keys in by_subject.items():
        if subject in crowded:
            continue
        first, *others = sorted(keys)  # a star: as connecting as every pair, n - 1 links
        for other in others:
            shared = sorted(keys[first] & keys[other])
            kind = "address" if shared else "/64"
            links[(first, other)] = Link(first, other, kind, shared[0] if shared else subject)
    for subject, acceptors in by_terms.items():
        if subject in crowded:
            continue
        users = sorted(acceptors | set(by_subject.get(subject, {})))
        for acceptor in sorted(acceptors):
            pair = (users[0], acceptor) if users[0] != acceptor else (users[0], users[-1])
            if pair[0] != pair[1] and pair not in links:
                links[pair] = Link(*pair, "terms", subject)
    return sorted(links.values(), key=lambda link: (link.a, link.b)), sorted(crowded)


def crafted(state: ModelState, config: MonitorConfig) -> bool:
    """Whether a key's own queries to one model look crafted rather than natural (judged
    from ``min_queries`` analysed queries on, as levels are)."""
    if state.analysed < config.min_queries:
        return False
    if state.prada_w is not None and state.prada_w < config.prada_threshold:
        return True
    return wilson_low(state.ood, state.analysed, config.ood_confidence) >= config.ood_low


def mixing(a: ModelState, b: ModelState, min_points: int = 64, min_bucket: int = 8) -> float | None:
    """Schilling's statistic for two keys' reservoirs, the lower of its two directions (a
    narrow source inside a broad one mixes one way only); None: too few queries to tell.

    Per predicted class holding at least ``min_bucket`` queries of each key: for each query,
    whether its nearest other query is the other key's; that share over the share expected if
    both keys drew from one distribution.
    """
    if (
        a.space != b.space
        or a.reservoir.ndim != 3
        or a.reservoir.shape[1:] != b.reservoir.shape[1:]
    ):
        return None
    size = a.reservoir.shape[1]
    cross, expected, points = np.zeros(2), np.zeros(2), 0
    for bucket in range(min(len(a.seen), len(b.seen))):
        ours = a.reservoir[bucket, : min(int(a.seen[bucket]), size)].astype(np.float32)
        theirs = b.reservoir[bucket, : min(int(b.seen[bucket]), size)].astype(np.float32)
        if len(ours) < min_bucket or len(theirs) < min_bucket:
            continue
        pooled = np.concatenate([ours, theirs])
        owner = (np.arange(len(pooled)) >= len(ours)).astype(np.int64)
        squared = np.sum((pooled[:, None, :] - pooled[None, :, :]) ** 2, axis=2)
        np.fill_diagonal(squared, np.inf)
        other = owner[squared.argmin(axis=1)] != owner
        for side in (0, 1):
            cross[side] += np.count_nonzero(other[owner == side])
        share = len(ours) * len(theirs) / (len(pooled) - 1)  # expected per side
        expected += share
        points += len(pooled)
    if points < min_points:
        return None
    return float(np.min(cross / expected))


def distribution_links(
    states: Mapping[str, Mapping[str, ModelState]], threshold: float, min_points: int = 64
) -> list[Link]:
    """Links between crafted-looking keys whose queries to one model intermingle (``mixing``
    at least ``threshold``); ``states`` maps key ids to the model states judged crafted."""
    links = []
    for a, b in combinations(sorted(states), 2):
        for model in sorted(set(states[a]) & set(states[b])):
            value = mixing(states[a][model], states[b][model], min_points)
            if value is not None and value >= threshold:
                links.append(Link(a, b, "distribution", f"{model} (mixing {value:.2f})"))
                break
    return links


def is_ip(address: str) -> bool:
    """Whether ``address`` is an IP address (a non-IP client, e.g. a Unix socket, links nothing)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
