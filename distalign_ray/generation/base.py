"""The engine interface: one request = one prompt, n samples, one seed; plus the readout scores.

Every engine returns the same schema, so the pipeline, the tables and the metrics do not care which
engine produced a sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class SteeringSetup:
    """How a model was fine-tuned: its steering token ids (class order) and each class's answer tokens."""

    token_ids: list[int] | None
    answer_ids: list[list[int]] = field(default_factory=list)

    @property
    def steered(self) -> bool:
        return bool(self.token_ids)


@dataclass(frozen=True)
class Request:
    """n samples of one prompt from one seed; `with_readout=False` skips the readout (only the first
    chunk of a (context, template) needs it), keeping just what steered sampling needs."""

    prompt_ids: list[int]
    n: int
    seed: int
    with_readout: bool = True


@dataclass
class GenerationResult:
    texts: list[str]
    steering_indices: list[int]  # -1 when the model is not steered
    readout: list[float]  # class distribution from token probabilities (no sampling); [] when skipped
    cut: list[bool] = field(default_factory=list)  # per text: stopped by max_new_tokens before its EOS


class GenerationEngine(ABC):
    @abstractmethod
    def generate(self, request: Request) -> GenerationResult:
        """n samples for one prompt. A steered model first samples the steering id from its softmax
        renormalised over the ids (T=1), places it as the first assistant token, then continues."""

    def generate_many(self, requests: list[Request]) -> list[GenerationResult]:
        """Requests served together; engines that batch across prompts override it."""
        return [self.generate(request) for request in requests]
