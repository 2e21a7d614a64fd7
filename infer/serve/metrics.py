"""The server's Prometheus metrics."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics of one server (own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("orthrus_requests", "Requests by outcome", ["outcome"],
                                registry=r)
        self.tokens = Counter("orthrus_generated_tokens", "Generated tokens", registry=r)
        self.tokens_per_iteration = Histogram(
            "orthrus_tokens_per_iteration", "Tokens a slot committed per decode iteration",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.queue = Gauge("orthrus_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy = Gauge("orthrus_slots_busy", "Slots holding a request", registry=r)
        self.ttft = Histogram("orthrus_time_to_first_token_seconds",
                              "Arrival to first token", registry=r)
        self.prefix_queries = Counter("orthrus_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("orthrus_prefix_cache_hits",
                                   "Prompt tokens whose K/V came from the prefix cache",
                                   registry=r)
        self.prefix_blocks = Gauge("orthrus_prefix_cache_blocks",
                                   "Blocks held by the prefix cache", registry=r)
        self.block_size = Gauge("orthrus_block_size",
                                "Block size of the latest decode step (1: plain AR steps)",
                                registry=r)
        self.tree_budget = Gauge("orthrus_tree_budget",
                                 "Draft-tree budget of the latest decode step (0: chains)",
                                 registry=r)
        self.tpot = Histogram("orthrus_time_per_output_token_seconds",
                              "Seconds per output token after the first", registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

