"""Ray Tune sweeps of the hybrid loss (KL/KTO weights, learning rate, KTO beta)."""
