"""Training pieces: losses and the optimizer."""
