"""Ray: the driver's metrics, through Ray's metrics API, so they reach the same Prometheus endpoint (each node's
`--metrics-export-port`) and the Ray dashboard's Grafana as the actors' own. Prometheus shows them with Ray's
`ray_` prefix, and counters with a `_total` suffix (docs/operations.md lists them); each carries the OUT it
writes as the tag `output`. Counters are published at 0 from the start, so that an alert on them reads 0, not
"no data".
"""

from __future__ import annotations

import time

from ray.util import metrics

from .progress import Progress, Tick
from .replicas import publish_zero

_EVERY_S = 1.0  # Ray exports every few seconds; setting values more often than this only costs the loop


class DriverMetrics:
    def __init__(self, output: str) -> None:
        self.tags = {"output": output}
        keys = ("output",)
        self.counters = {
            "done": metrics.Counter("vqpipe_shards_done", "Shards committed by this run", tag_keys=keys),
            "failed": metrics.Counter(
                "vqpipe_shards_failed", "Shards failed for good in this run", tag_keys=keys
            ),
            "retries": metrics.Counter(
                "vqpipe_shard_retries", "Failed shard attempts retried", tag_keys=keys
            ),
        }
        self.gauges = {
            name: metrics.Gauge(f"vqpipe_{name}", text, tag_keys=keys)
            for name, text in (
                ("shards_pending", "Shards waiting for a replica (retries in backoff included)"),
                ("shards_in_flight", "Shard copies running on replicas"),
                ("replicas_live", "Replicas placed, loaded and given shards"),
                ("replicas_pending", "Replicas asked for, not live: unplaced, loading or restarting"),
                ("images_per_second", "Images committed per second since the run started"),
            )
        }
        self._sent = dict.fromkeys(self.counters, 0)
        self._at = 0.0
        for counter in self.counters.values():
            publish_zero(counter, self.tags)

    def update(self, progress: Progress, tick: Tick, force: bool = False) -> None:
        """Publish the run's counts as of `tick` (at most once a second unless `force`)."""
        now = time.monotonic()
        if not force and now - self._at < _EVERY_S:
            return
        self._at = now
        totals = {"done": progress.done, "failed": progress.failed, "retries": tick.retries}
        for name, total in totals.items():
            if total > self._sent[name]:
                self.counters[name].inc(total - self._sent[name], tags=self.tags)
                self._sent[name] = total
        values = {
            "shards_pending": tick.shards_queued,
            "shards_in_flight": tick.shards_running,
            "replicas_live": tick.replicas_live,
            "replicas_pending": tick.replicas_pending,
            "images_per_second": progress.rate,
        }
        for name, value in values.items():
            self.gauges[name].set(value, tags=self.tags)
