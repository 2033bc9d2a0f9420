"""Fitting the heads and building bundles (scikit-learn). The runtime never imports this package."""
