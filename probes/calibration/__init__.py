"""Calibration: the exact binomial tail, Learn-then-Test thresholds and unsafe cuts, the cascade rule, and
online recalibration from audited events (numpy only; the worker imports it)."""
