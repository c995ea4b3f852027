from distalign_ray.models.registry import ModelRef, load_model, load_tokenizer, model_on_this_node, resolve_model

__all__ = ["ModelRef", "load_model", "load_tokenizer", "model_on_this_node", "resolve_model"]
