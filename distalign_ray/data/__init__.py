"""Distribution specs, built-in datasets, prompts and steering-token training examples."""
