"""The method registry: every method compared, and how it is obtained. Adding a method is one entry.

Everything else is derived from it: the `loss_mode` choices of the fine-tuning config and of the
CLI (the trained methods), the terms of the steering objective, the training stages (by `recipe`,
see `training/stages.py`), and the rows of a comparison.

All methods are estimated with exactly the same decoding settings (the reference code compared
methods under different decoding; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distalign_ray.errors import DistalignError

Recipe = Literal["steering", "ift", "dpo"]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    recipe: Recipe | None = None  # how it is trained (training/stages.py); None: the base model as is
    kl: bool = False  # steering recipe: the objective has the steering-KL term
    kto: bool = False  # steering recipe: the objective has the KTO term
    init_from: str | None = None  # train starting from this method's adapter
    prompt_engineering: bool = False
    ablation: bool = False  # a comparison runs its cells after the main methods' (compare/grid.py: plan_cells)

    @property
    def trained(self) -> bool:
        return self.recipe is not None

    @property
    def tuned_fields(self) -> tuple[str, ...]:
        """The finetune fields a comparison's Tune budget searches: the learning rate, and beta where the
        objective has one (KTO, DPO)."""
        if not self.trained:
            return ()
        return ("lr", "beta") if self.kto or self.recipe == "dpo" else ("lr",)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method (in comparison order). A steering method needs at least one objective term."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.recipe == "steering" and not (method.kl or method.kto):
        raise ValueError(f"steering method {method.name!r} has neither the KL nor the KTO term")
    if method.init_from is not None and method.init_from not in METHODS:
        raise ValueError(f"method {method.name!r} starts from unknown method {method.init_from!r}")
    METHODS[method.name] = method
    return method


for _method in (
    Method("zero-shot", "the base model as is"),
    Method("prompt-engineering", "the base model; the prompt states the target distribution", prompt_engineering=True),
    Method("ift", "SFT on plain answers drawn in the target proportions", recipe="ift"),
    Method("dpo", "DPO toward the target proportions, starting from the IFT adapter", recipe="dpo", init_from="ift"),
    Method("hybrid", "steering token: KL on the steering ids + KTO binding (ours)", recipe="steering", kl=True, kto=True),
    Method("kl_only", "steering token: KL term only (ablation)", recipe="steering", kl=True, ablation=True),
    Method("kto_only", "steering token: KTO term only (ablation)", recipe="steering", kto=True, ablation=True),
):
    register_method(_method)


def trained_method_names() -> list[str]:
    """The `loss_mode` choices: every method that is fine-tuned, in registry order."""
    return [m.name for m in METHODS.values() if m.trained]


def trained_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None or not method.trained:
        raise ValueError(f"loss_mode must be one of {', '.join(trained_method_names())}")
    return method


def get_methods(names: list[str] | None) -> list[Method]:
    """The named methods in registry order, plus any they start from (DPO needs IFT)."""
    if not names:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise DistalignError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    wanted = set(names)
    for name in names:
        while METHODS[name].init_from:
            name = METHODS[name].init_from
            wanted.add(name)
    return [m for m in METHODS.values() if m.name in wanted]
