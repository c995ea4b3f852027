"""Hybrid-loss LoRA fine-tuning on Ray Train."""
