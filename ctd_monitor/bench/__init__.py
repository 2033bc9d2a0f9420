"""Benchmarks (each prints JSON through ``ctd-monitor bench``) and the drift simulator."""
