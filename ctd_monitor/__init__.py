"""ctd-monitor command line: one console script over the offline (probes) and streaming (worker) sides."""
