"""Prometheus metrics of the gateway, `worldstream_gateway_<metric>` like the services' own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()

        def name(metric: str) -> str:
            return f"worldstream_gateway_{metric}"

        self.tabs_connected = Gauge(name("tabs_connected"), "Open page WebSockets", registry=self.registry)
        self.sessions_active = Gauge(name("sessions_active"), "Decoder sessions held for tabs", registry=self.registry)
        self.sessions_started = Counter(name("sessions_started"), "Sessions started, by frame transport",
                                        ["transport"], registry=self.registry)
        self.frames_sent = Counter(name("frames_sent"), "Frames handed to a tab's transport", ["transport"],
                                   registry=self.registry)
        self.bytes_sent = Counter(name("bytes_sent"), "Frame bytes sent over WebSockets (WebRTC's are not counted)",
                                  ["transport"], registry=self.registry)
        self.input_messages = Counter(name("input_messages"), "Input messages received from pages",
                                      registry=self.registry)
        self.errors = Counter(name("errors"), "Errors shown to pages, by code", ["code"], registry=self.registry)
        self.block_receive_delay = Histogram(
            name("block_receive_delay_seconds"), "Decoder's send_time of a block (BlockChunk) or of its early frames "
            "(BlockFrames) to their arrival here",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.paint_latency = Histogram(
            name("paint_latency_seconds"), "Decoder's send_time of the message that carried a frame to the frame "
            "painted in the page (reported by the pages)", ["transport"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
