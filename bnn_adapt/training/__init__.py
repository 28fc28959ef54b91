"""Training: the Lightning module, data, the pruning plan, lean backprop, the tap cache and run statistics."""
