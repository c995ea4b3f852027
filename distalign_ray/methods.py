"""The method registry: every method compared, and how it is obtained. Adding a method is one entry.

All methods are estimated with exactly the same decoding settings (the reference code compared
methods under different decoding; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass

from distalign_ray.errors import DistalignError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    loss_mode: str | None = None  # None: no training (the base model as is)
    init_from: str | None = None  # train starting from this method's adapter
    prompt_engineering: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", "the base model as is"),
        Method("prompt-engineering", "the base model; the prompt states the target distribution", prompt_engineering=True),
        Method("ift", "SFT on plain answers drawn in the target proportions", loss_mode="ift"),
        Method("dpo", "DPO toward the target proportions, starting from the IFT adapter", loss_mode="dpo", init_from="ift"),
        Method("hybrid", "steering token: KL on the steering ids + KTO binding (ours)", loss_mode="hybrid"),
        Method("kl_only", "steering token: KL term only (ablation)", loss_mode="kl_only"),
        Method("kto_only", "steering token: KTO term only (ablation)", loss_mode="kto_only"),
    )
}


def get_methods(names: list[str] | None) -> list[Method]:
    """The named methods in registry order, plus any they start from (DPO needs IFT)."""
    if not names:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise DistalignError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    wanted = set(names)
    for name in names:
        if METHODS[name].init_from:
            wanted.add(METHODS[name].init_from)
    return [m for m in METHODS.values() if m.name in wanted]
