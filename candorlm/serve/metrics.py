"""Prometheus metrics of a server, in the exposition format, named as vLLM names them with a
`candor:` prefix instead of `vllm:` (as SGLang uses `sglang:`): an operator's vLLM dashboard
needs only the prefix changed, and nothing claims to be vLLM. It measures nothing itself: the
server records each request here, and the engine's stats() are read at each scrape.

Names (labels: model_name; request_success also finished_reason):
  gauges      candor:num_requests_running, candor:num_requests_waiting, candor:kv_cache_usage_perc
  counters    candor:prompt_tokens_total, candor:generation_tokens_total, candor:request_success_total,
              candor:prefix_cache_queries_total, candor:prefix_cache_hits_total
  histograms  candor:time_to_first_token_seconds, candor:time_per_output_token_seconds,
              candor:e2e_request_latency_seconds, candor:request_prompt_tokens, candor:request_generation_tokens

prompt_tokens counts each request's prompt once (whatever its n; a prompt served from the prefix
cache still counts); generation_tokens counts every token sent, over all of a request's choices,
cancelled requests' included. running and waiting are the engine's; kv_cache_usage_perc is the
fraction (0..1) of its KV cache in use, as vLLM's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)

NAMES = ("candor:num_requests_running", "candor:num_requests_waiting", "candor:kv_cache_usage_perc",
         "candor:prompt_tokens_total", "candor:generation_tokens_total", "candor:request_success_total",
         "candor:prefix_cache_queries_total", "candor:prefix_cache_hits_total",
         "candor:time_to_first_token_seconds", "candor:time_per_output_token_seconds",
         "candor:e2e_request_latency_seconds", "candor:request_prompt_tokens", "candor:request_generation_tokens")


def token_buckets(max_model_len: int) -> list[int]:
    """vLLM's 1-2-5 buckets up to the context length."""
    out, mantissa, exp = [], (1, 2, 5), 1
    while True:
        for m in mantissa:
            if m * exp > max_model_len:
                return out
            out.append(m * exp)
        exp *= 10


class _EngineStats:
    """Reads the engine's stats() at each scrape (a prometheus_client custom collector)."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        s = self.m.engine_stats()
        labels = [self.m.model_name]
        for name, key, doc in (("num_requests_running", "running", "Requests in the running batch."),
                               ("num_requests_waiting", "waiting", "Requests waiting for a slot."),
                               ("kv_cache_usage_perc", "kv_usage", "Fraction of the KV cache in use (0..1).")):
            g = GaugeMetricFamily(f"candor:{name}", doc, labels=["model_name"])
            g.add_metric(labels, float(s.get(key, 0)))
            yield g
        for name, key, doc in (("prefix_cache_queries", "prefix_queries", "Prompt tokens looked up in the cache."),
                               ("prefix_cache_hits", "prefix_hits", "Prompt tokens found in the prefix cache.")):
            c = CounterMetricFamily(f"candor:{name}", doc, labels=["model_name"])
            c.add_metric(labels, float(s.get(key, 0)))
            yield c


class Metrics:
    """The metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self, model_name: str, max_model_len: int, engine_stats=lambda: {}):
        self.model_name, self.engine_stats = model_name, engine_stats
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.prompt_tokens = Counter("candor:prompt_tokens", "Prompt tokens received.", lab, registry=r)
        self.generation_tokens = Counter("candor:generation_tokens", "Tokens generated.", lab, registry=r)
        self.success = Counter("candor:request_success", "Requests finished, by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("candor:time_to_first_token_seconds", "Time to the first token.", lab,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("candor:time_per_output_token_seconds", "Time per output token after the first.",
                              lab, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("candor:e2e_request_latency_seconds", "Time from arrival to the last token.", lab,
                             buckets=E2E_BUCKETS, registry=r)
        buckets = token_buckets(max_model_len)
        self.req_prompt = Histogram("candor:request_prompt_tokens", "Prompt tokens per request.", lab,
                                    buckets=buckets, registry=r)
        self.req_gen = Histogram("candor:request_generation_tokens", "Generated tokens per request.", lab,
                                 buckets=buckets, registry=r)
        for finish in ("stop", "length", "abort"):  # present from the start, as vLLM's are
            self.success.labels(model_name, finish)
        for m in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e, self.req_prompt,
                  self.req_gen):
            m.labels(model_name)
        r.register(_EngineStats(self))

    def request_done(self, prompt_tokens: int, generated: int, finish: str, arrival: float, first: float | None,
                     last: float | None) -> None:
        """One request ended (finish: stop, length or abort); times from time.monotonic()."""
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generated)
        self.success.labels(name, finish).inc()
        self.req_prompt.labels(name).observe(prompt_tokens)
        self.req_gen.labels(name).observe(generated)
        if first is not None:
            self.ttft.labels(name).observe(first - arrival)
            if generated > 1 and last is not None:
                self.tpot.labels(name).observe((last - first) / (generated - 1))
        if last is not None:
            self.e2e.labels(name).observe(last - arrival)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
