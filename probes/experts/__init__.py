"""Expert backends: stronger (and costlier) scorers the cascade delegates to."""
