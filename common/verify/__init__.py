"""Checks across backends: parity against the oracle, the shape harness and the layer summary."""
