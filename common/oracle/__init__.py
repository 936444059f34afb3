"""The float64 numpy oracle (forward and exact gradients) and the golden vectors made from it."""
