"""What each training recipe trains: its stages, their data (grouped by prompt) and step losses.

A method (methods.py) names its recipe; a recipe is one builder registered here:
- steering (hybrid / kl_only / kto_only): stage `sft` (bind steering ids to answers), then stage
  `align` with the method's objective terms;
- ift: plain SFT on answers drawn in the target proportions (no steering token);
- dpo: preference pairs toward the target proportions, usually starting from the IFT adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.baselines import build_dpo_pairs, build_ift_examples
from distalign_ray.data.prompts import build_prompts, chat_prompt_ids
from distalign_ray.data.specs import DistributionSpec
from distalign_ray.data.steering import build_steering_examples
from distalign_ray.methods import Recipe, trained_method
from distalign_ray.training.budget import TrainingBudget
from distalign_ray.training.objective import dpo_step_loss, fill_kto_reference, hybrid_step_loss, sft_step_loss


def uses_steering(cfg: FinetuneConfig) -> bool:
    return trained_method(cfg.loss_mode).recipe == "steering"


@dataclass
class Stage:
    name: str
    epochs: int
    lr: float
    groups: list[list]  # per-prompt groups of examples (a batch is a set of whole groups)
    step: Callable[[object, list], dict]
    # Run with the scorer when the stage starts (KTO's frozen reference log-probs, kept on the examples
    # and in checkpoints); None: nothing to prepare.
    prepare: Callable[[object], None] | None = None

    def examples(self) -> list:
        return [example for group in self.groups for example in group]


def group_by_prompt(items: list) -> list[list]:
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault((item.context_index, item.template), []).append(item)
    return list(groups.values())


def validation_set(spec: DistributionSpec, tokenizer, templates: list[str] | None) -> list[tuple[list[int], list[float]]]:
    return [(chat_prompt_ids(tokenizer, row), spec.targets[row.context_index]) for row in build_prompts(spec, "attribute", templates)]


@torch.no_grad()
def _fill_reference_logps(scorer, pairs) -> None:
    """The frozen starting model's log-probs, once: the DPO reference is the model DPO starts from
    (the IFT adapter), not the bare base model."""
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        prompts = [p.prompt_ids for p in chunk]
        _, logps, _ = scorer(prompts + prompts, [p.chosen_ids for p in chunk] + [p.rejected_ids for p in chunk])
        sums = logps.sum(-1).tolist()
        for i, pair in enumerate(chunk):
            pair.reference_chosen, pair.reference_rejected = sums[i], sums[len(chunk) + i]


StageBuilder = Callable[..., list[Stage]]
RECIPES: dict[str, StageBuilder] = {}


def recipe(name: Recipe) -> Callable[[StageBuilder], StageBuilder]:
    """Registers the stage builder of a training recipe."""

    def register(builder: StageBuilder) -> StageBuilder:
        RECIPES[name] = builder
        return builder

    return register


def build_stages(
    cfg: FinetuneConfig, spec: DistributionSpec, tokenizer, vocab, scorer, budget: TrainingBudget, z0_reduce=None
) -> list[Stage]:
    method = trained_method(cfg.loss_mode)
    return RECIPES[method.recipe](cfg, spec, tokenizer, vocab, scorer, budget, z0_reduce)


@recipe("steering")
def _steering_stages(cfg, spec, tokenizer, vocab, scorer, budget, z0_reduce) -> list[Stage]:
    examples = build_steering_examples(spec, tokenizer, vocab, cfg.templates)
    ids = vocab.token_ids
    kto = trained_method(cfg.loss_mode).kto
    return [
        Stage(
            "sft",
            budget.sft_epochs,
            cfg.sft_lr,
            group_by_prompt([e for e in examples if e.desirable]),
            lambda s, batch: sft_step_loss(s, batch, ids, cfg),
        ),
        Stage(
            "align",
            budget.epochs,
            cfg.lr,
            group_by_prompt(examples),
            lambda s, batch: hybrid_step_loss(s, batch, ids, cfg, z0_reduce=z0_reduce),
            prepare=(lambda s: fill_kto_reference(s, examples, ids, cfg)) if kto else None,
        ),
    ]


@recipe("ift")
def _ift_stages(cfg, spec, tokenizer, vocab, scorer, budget, z0_reduce) -> list[Stage]:
    examples = build_ift_examples(spec, tokenizer, cfg.answers_per_context, cfg.templates)
    # token mean, as the paper's IFT (ms-swift) trains: the fit of the class shares (losses/sft.py)
    return [
        Stage(
            "ift", budget.epochs, cfg.lr, group_by_prompt(examples), lambda s, batch: sft_step_loss(s, batch, None, cfg, reduction="token")
        )
    ]


@recipe("dpo")
def _dpo_stages(cfg, spec, tokenizer, vocab, scorer, budget, z0_reduce) -> list[Stage]:
    pairs = build_dpo_pairs(spec, tokenizer, cfg.answers_per_context, cfg.templates)
    scorer.eval()
    _fill_reference_logps(scorer, pairs)
    scorer.train()
    return [Stage("dpo", budget.epochs, cfg.lr, group_by_prompt(pairs), lambda s, batch: dpo_step_loss(s, batch, cfg))]


@torch.no_grad()
def readout_probs(model, prompts: list[list[int]], steering_ids: list[int] | None, answers: list[list[int]], pad_id: int):
    """The validation readout (a `Readout`): steering-id distribution for steered models, forced choice otherwise."""
    from distalign_ray.training.objective import forced_choice_readout, steering_readout

    if steering_ids:
        return steering_readout(model, prompts, steering_ids, pad_id)
    return forced_choice_readout(model, prompts, answers, pad_id)
