"""Answer classification, distribution metrics, bootstrap CIs, and plots."""
