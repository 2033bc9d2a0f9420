"""Streaming side of ctd-monitor: Kafka consumers, batching, verdicts."""
