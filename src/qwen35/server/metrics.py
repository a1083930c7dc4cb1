"""Prometheus text exposition of what the server and its engine are doing."""

from __future__ import annotations

import threading
from collections import Counter


class HTTPCounters:
    def __init__(self):
        self._counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def record(self, route: str, status: int) -> None:
        with self._lock:
            self._counts[(route, status)] += 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(state) -> str:
    service = state.service
    stats = service.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP qwen35_{name} {help_text}")
        lines.append(f"# TYPE qwen35_{name} {kind}")
        for labels, value in samples:
            lines.append(f"qwen35_{name}{labels} {value:g}" if isinstance(value, float) else
                         f"qwen35_{name}{labels} {value}")

    metric("http_requests_total", "counter", "HTTP requests answered, by route and status.",
           [(f'{{route="{_escape(route)}",status="{status}"}}', count) for (route, status), count
            in state.http.items()])
    metric("requests_total", "counter", "Generation requests finished, by reason.",
           [(f'{{reason="{reason}"}}', count) for reason, count in sorted(stats.requests_by_reason.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", stats.prompt_tokens)])
    metric("cached_prompt_tokens_total", "counter", "Prompt tokens restored from the prefix cache.",
           [("", stats.cached_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
    metric("draft_tokens_total", "counter", "Speculative decoding: guesses checked.", [("", stats.draft_tokens)])
    metric("draft_tokens_accepted_total", "counter", "Speculative decoding: guesses kept.",
           [("", stats.accepted_tokens)])
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", float(stats.tokens_per_second()))])
    metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", service.queue_depth)])
    metric("running_requests", "gauge", "Requests in the running batch.", [("", service.running)])
    metric("prefix_cache_hits_total", "counter", "Requests that started from a cached prefix.",
           [("", stats.prefix_hits)])
    metric("prefix_cache_misses_total", "counter", "Requests that found no cached prefix.",
           [("", stats.prefix_misses)])
    metric("prefix_cache_bytes", "gauge", "Memory held by prefix-cache snapshots.",
           [("", service.prefix_store.nbytes)])
    metric("prefix_cache_entries", "gauge", "Prefix-cache snapshots held.", [("", len(service.prefix_store))])
    outcomes = {**stats.prefix_jobs, "dropped": service.scheduler.background_dropped}
    metric("prefix_cache_warmups_total", "counter",
           "Background prefills of a conversation's next-turn history, by outcome (stored; cached: nothing to do; "
           "adopted: taken over by the next turn's request; dropped: too many queued; failed).",
           [(f'{{outcome="{outcome}"}}', count) for outcome, count in sorted(outcomes.items())])
    metric("prefix_cache_warmups_pending", "gauge", "Background prefills queued or in progress.",
           [("", service.prefix_jobs_pending)])
    return "\n".join(lines) + "\n"
