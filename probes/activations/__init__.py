"""What turns a conversation into activations: model loading, rendering, untrusted-text hygiene, windows,
feature extraction, batching and the per-record feature cache."""
