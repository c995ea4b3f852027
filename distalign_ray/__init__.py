"""distalign_ray: steer repeated LLM generations toward a target distribution, on Ray."""

__version__ = "0.1.0"
