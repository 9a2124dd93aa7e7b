"""Prometheus metrics through Ray's metrics agent (scraped from each node's
`--metrics-export-port`; Ray prefixes the names with `ray_`). Serve adds the
deployment, replica and application tags itself."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from decoding.request import GenerationStats

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ACCEPTED = [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 13]


class Metrics:
    def __init__(self) -> None:
        tags = ("model", "route")
        self.requests = Counter("specray_requests", "Requests answered, by HTTP status",
                                tag_keys=tags + ("status",))
        self.generated = Counter("specray_generated_tokens", "Tokens generated", tag_keys=tags)
        self.drafted = Counter("specray_draft_tokens", "Draft tokens proposed for verification", tag_keys=tags)
        self.accepted = Counter("specray_accepted_tokens", "Draft tokens the verifier accepted", tag_keys=tags)
        self.mean_accepted = Histogram("specray_mean_accepted_length",
                                       "Tokens committed per verify forward, per request",
                                       boundaries=_ACCEPTED, tag_keys=tags)
        self.ttft = Histogram("specray_time_to_first_token_seconds", "Arrival to first token, queueing included",
                              boundaries=_LATENCY_S, tag_keys=tags)
        self.per_token = Histogram("specray_time_per_output_token_seconds",
                                   "Decode time per generated token after the first, per request",
                                   boundaries=_LATENCY_S, tag_keys=tags)
        self.predraft = Counter("specray_predraft_rounds",
                                "ssd: verify rounds answered from a pre-draft (hit, by its outcome's rank) or not",
                                tag_keys=tags + ("result", "rank"))
        self.predraft_wasted = Counter("specray_predraft_wasted_tokens", "ssd: tokens pre-drafted and never sent",
                                       tag_keys=tags)
        self.verifier_wait = Counter("specray_verifier_wait_seconds",
                                     "Time the verifier waited for its drafter's drafts", tag_keys=tags)
        self.pending = Gauge("specray_pending_requests", "Requests decoding or waiting on this replica",
                             tag_keys=("model",))

        self.batch = Gauge("specray_running_sequences", "Sequences decoding together in this replica's batch",
                           tag_keys=("model",))
        self.draft_length = Gauge("specray_draft_length",
                                  "Draft length the scheduler chose for the latest round (0: no speculation)",
                                  tag_keys=("model",))

    def load(self, model: str, state: dict) -> None:
        self.batch.set(state.get("running", 0), tags={"model": model})
        self.draft_length.set(state.get("draft_length", 0), tags={"model": model})

    def answered(self, model: str, route: str, status: int) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})

    def finished(self, model: str, route: str, stats: GenerationStats, ttft_s: float | None,
                 decode_s: float) -> None:
        tags = {"model": model, "route": route}
        if stats.new_tokens:
            self.generated.inc(stats.new_tokens, tags=tags)
        if stats.drafted_tokens:
            self.drafted.inc(stats.drafted_tokens, tags=tags)
        if stats.accepted_tokens:
            self.accepted.inc(stats.accepted_tokens, tags=tags)
        if stats.verify_rounds:
            self.mean_accepted.observe(stats.mean_accepted, tags=tags)
        for rank, hits in enumerate(stats.predraft_hit_ranks):
            if hits:
                self.predraft.inc(hits, tags={**tags, "result": "hit", "rank": str(rank)})
        if stats.predraft_misses:
            self.predraft.inc(stats.predraft_misses, tags={**tags, "result": "miss", "rank": "-"})
        if stats.predraft_wasted:
            self.predraft_wasted.inc(stats.predraft_wasted, tags=tags)
        if stats.wait_s > 0:
            self.verifier_wait.inc(stats.wait_s, tags=tags)
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags=tags)
        if stats.new_tokens > 1:
            self.per_token.observe(decode_s / (stats.new_tokens - 1), tags=tags)
