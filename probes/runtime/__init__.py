"""What the worker imports to score traffic: the monitor, the stream scorer, and the bundle with its manifest."""
