"""Server metrics in Prometheus' text format (version 0.0.4).

Written out here rather than with `prometheus_client`: the server needs two histograms, a few
counters and two gauges, and the text format is a dozen lines; the library would add a dependency
and a process-global registry that every test's server would share.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

# Seconds. Time to first token spans a prefill; inter-token latency one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


class Metrics:
    """Updated by the engine thread, read by the HTTP handlers: one lock around both."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {
            "herd_prompt_tokens_total": ("Prompt tokens of admitted requests.", 0),
            "herd_generation_tokens_total": ("Tokens generated.", 0),
            "herd_requests_finished_total": ("Engine requests finished (one per choice).", 0),
            "herd_requests_rejected_total": ("Requests refused with 429 because the queue was full.", 0),
        }
        self.ttft = Histogram("herd_time_to_first_token_seconds", "From arrival to the first token.", TTFT_BUCKETS)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             ITL_BUCKETS)

    def add(self, name: str, amount: int = 1):
        with self.lock:
            help, value = self.counters[name]
            self.counters[name] = (help, value + amount)

    def render(self, gauges: dict[str, tuple[str, Callable[[], int]]]) -> str:
        with self.lock:
            lines = []
            for name, (help, read) in gauges.items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {read()}"]
            for name, (help, value) in self.counters.items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += self.ttft.render() + self.itl.render()
        return "\n".join(lines) + "\n"
