"""Development benchmarks of the streaming worker (each prints JSON through ``ctd-monitor bench``)."""
