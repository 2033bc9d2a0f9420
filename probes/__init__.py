"""Offline side of ctd-monitor: models, activations, probes, experts, calibration, evaluation.

Nothing here imports ``worker``: the offline tooling runs without Kafka.
"""

__version__ = "0.1.0"
