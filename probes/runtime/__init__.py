"""What the worker imports to score traffic: the monitor, the stream scorer, the bundle and its manifest."""
