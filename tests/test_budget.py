"""Training budgets scale with the spec (issue 11): small specs get enough steps, the quickstart keeps its own."""

from __future__ import annotations

from distalign_ray.config import FinetuneConfig
from distalign_ray.data.specs import DistributionSpec, load_spec, spec_from_dict
from distalign_ray.training.budget import plan_budget


def _spec(contexts: int, templates: int = 2) -> DistributionSpec:
    names = [f"place {i}" for i in range(contexts)]
    return spec_from_dict(
        {
            "name": "budget-test",
            "attribute": "colour",
            "categories": ["red", "blue", "green"],
            "contexts": names,
            "target": {n: {"red": 0.5, "blue": 0.3, "green": 0.2} for n in names},
            "templates": {
                "attribute": [f"Template {t}: a thing at {{context}}. Is it {{categories_or}}?" for t in range(templates)],
                "story": "A story about {context}.",
                "prompt_engineering": "Follow {target}.",
            },
        }
    )


def test_quickstart_budget_is_unchanged():
    budget = plan_budget(FinetuneConfig(), load_spec("gender-uk-real"))
    assert (budget.prompts, budget.prompts_per_batch, budget.sft_epochs, budget.epochs) == (50, 8, 2, 5)
    assert (budget.sft_steps, budget.steps) == (14, 35)


def test_small_spec_gets_small_batches_and_enough_steps():
    budget = plan_budget(FinetuneConfig(), _spec(6))  # 12 prompts: the spec of issue 11
    assert budget.prompts_per_batch == 2
    assert (budget.sft_epochs, budget.sft_steps, budget.steps) == (9, 54, 36)  # was 4 + 10 (8 per batch, 2 + 5 epochs)
    tiny = plan_budget(FinetuneConfig(), _spec(3, templates=1))
    assert (tiny.prompts_per_batch, tiny.sft_epochs, tiny.sft_steps, tiny.steps) == (1, 34, 102, 36)


def test_every_answer_is_trained_as_often_as_in_the_quickstart():
    for contexts, templates in ((1, 1), (3, 1), (6, 1), (14, 2), (25, 2), (40, 1), (50, 2)):
        budget = plan_budget(FinetuneConfig(), _spec(contexts, templates))
        assert budget.prompts * budget.sft_epochs >= 100, (contexts, templates)
    assert plan_budget(FinetuneConfig(min_sft_views=0), _spec(3, templates=1)).sft_epochs == 5  # min_sft_steps alone


def test_only_the_steering_recipe_has_an_sft_stage():
    # a Tune sweep's ASHA grace period and max_t count SFT epochs: IFT and DPO have none to count
    for method in ("ift", "dpo"):
        budget = plan_budget(FinetuneConfig(loss_mode=method), load_spec("gender-us-real"))
        assert (budget.sft_epochs, budget.sft_steps) == (0, 0), method
        assert budget.epochs == plan_budget(FinetuneConfig(), load_spec("gender-us-real")).epochs
    assert plan_budget(FinetuneConfig(loss_mode="kto_only"), _spec(6)).sft_epochs == 9


def test_large_spec_does_not_train_longer_than_its_epochs():
    budget = plan_budget(FinetuneConfig(), _spec(50))  # 100 prompts, 13 steps an epoch
    assert (budget.prompts_per_batch, budget.sft_epochs, budget.epochs) == (8, 2, 5)


def test_given_epochs_and_batch_size_are_kept():
    budget = plan_budget(FinetuneConfig(epochs=1, sft_epochs=0, prompts_per_batch=4), _spec(6))
    assert (budget.prompts_per_batch, budget.sft_epochs, budget.epochs, budget.steps_per_epoch) == (4, 0, 1, 3)
