"""The segment language and its two evaluators: plain Python and NumPy, no I/O."""
