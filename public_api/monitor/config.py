"""``MonitorConfig``: what the extraction monitor does and the knobs of its signals.

Defaults were tuned with ``bench/extraction_monitor.py`` on the digits demo (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["record", "alert", "throttle", "block"]


@dataclass(frozen=True)
class MonitorConfig:
    """Actions, thresholds and state sizes of the extraction monitor.

    ``action`` decides what a high score does: ``record`` only writes the assessment log (the
    level reaches "flagged" at most and nothing is logged); ``alert`` also emits the
    ``extraction_alert`` log event when a key crosses ``flag_threshold`` (the tier exports the
    score as a gauge); ``throttle`` additionally moves a key over ``block_threshold`` to
    "throttled" (a lower rate limit); ``block`` moves it to "blocked" (403 on every request).
    Throttled and blocked are sticky until an operator clears the key.

    The score is ``min(1, sum(weight * signal))`` over five signals in [0, 1]; the weights are
    the ``w_*`` fields. No level is raised before ``min_queries`` queries. Why these weights:

    * PRADA 0.6: a clearly crafted stream is flagged on that alone, blocked once one more
      signal (label spread, volume, OOD) agrees;
    * OOD 0.4 and volume 0.4: neither blocks alone; together, or with coverage, they do;
    * label and activation coverage 0.2 each: a broad natural user sits at about 0.3 after
      400 queries (the benchmark's heaviest benign clients score at most 0.30), well under
      ``flag_threshold``.

    So a key sending only natural, evenly spread, in-distribution queries at a steady pace is
    flagged around 1,000 unique queries and blocked around 2,300 (sooner in a burst of over
    ``burst_floor`` in two hours); ``volume_low``/``volume_high`` set that scale: raise them
    where legitimate users send more.
    """

    action: Action = "block"
    flag_threshold: float = 0.5
    block_threshold: float = 0.75
    min_queries: int = 50
    # Weights of the signals in the score.
    w_prada: float = 0.6
    w_ood: float = 0.4
    w_volume: float = 0.4
    w_labels: float = 0.2
    w_cells: float = 0.2
    # PRADA: queries kept per class bucket, distances kept, the Shapiro-Wilk W ramp: 0 at
    # W >= prada_threshold (delta), 1 at W <= prada_floor, judged from prada_min_distances on.
    reservoir_size: int = 32
    class_buckets: int = 16
    distance_reservoir: int = 256
    prada_min_distances: int = 100
    prada_threshold: float = 0.85
    prada_floor: float = 0.70
    max_input_dim: int = 256  # larger or non-float requests use front-activation PCA space
    # Repeats: a ring of hashes of recent queries; exact repeats teach an attacker nothing.
    repeat_window: int = 512
    # At most this many samples of a batch are analysed (distances, OOD, cells) per call, at
    # positions drawn with a secret seed per request (monitor.pick_rows).
    samples_per_call: int = 64
    # Label coverage: effective number of classes / (highest class seen + 1), ramped.
    label_buckets: int = 1024
    labels_low: float = 0.5
    labels_high: float = 0.9
    labels_min_queries: int = 50
    # Activation coverage: share of the reference's occupied grid cells visited.
    cells_low: float = 0.2
    cells_high: float = 0.6
    # Volume: unique queries over the key's life on a log ramp, and the last two hours
    # against max(burst_floor, burst_factor * the key's median of earlier active hours).
    volume_low: float = 300.0
    volume_high: float = 3000.0
    burst_floor: float = 500.0
    burst_factor: float = 10.0
    # OOD: lower confidence bound of the share beyond the reference threshold, ramped.
    ood_low: float = 0.05
    ood_high: float = 0.25
    ood_confidence: float = 0.99
    # The assessment log is written on a level change or at most every this many seconds.
    log_interval_s: float = 10.0
    # How often pending "monitor clear" requests in the assessment log are looked for.
    clear_poll_s: float = 2.0
    # Attempts at one compare-and-set update of a key's state while other replicas update it
    # too; past them the request gets 503 (its queries are never counted without a verdict).
    # Between attempts a random pause of up to cas_backoff_s * 2**attempt (at most 64 times
    # cas_backoff_s), so that two replicas racing in step fall out of step.
    cas_attempts: int = 16
    cas_backoff_s: float = 0.002
