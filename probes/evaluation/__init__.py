"""Evaluation and benchmarks of quality: delegation policies, the offline cascade, leave-source-out
generalisation, the streamed stop rule and the dilution yardstick. The runtime never imports this package."""
