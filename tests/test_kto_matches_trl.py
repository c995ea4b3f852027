"""Our `kto_loss` gives TRL's `KTOTrainer` loss on the same batch (TRL is the reference implementation)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distalign_ray.losses.kto import kto_loss  # noqa: E402

BETA = 0.5  # not TRL's default, so a dropped beta would show
DESIRABLE_WEIGHT = 1.3
UNDESIRABLE_WEIGHT = 0.7

# 3 desirable vs 5 undesirable: with balanced labels and weights averaging 1, swapped weights would go unnoticed.
# These weights are in TRL's recommended range for this imbalance, so it logs no warning.
ROWS = [
    ("The capital of France is", " Paris.", True),
    ("Two plus two equals", " four.", True),
    ("The sky on a clear day is", " green.", False),
    ("Water freezes at", " one hundred degrees.", False),
    ("A baker works in a", " hospital, caring for patients.", False),
    ("The opposite of hot is", " hot.", False),
    ("Cats are animals that", " like to sleep a lot.", True),
    ("The first month of the year is", " August, obviously.", False),
]


def completion_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """Summed log-probs of the completion tokens: token t is scored by the logits at t - 1."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def load_models(path: str, policy_logit_scale: float):
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # The final RMSNorm weight scales the logits linearly. A random model's next-token guesses are noise, so a
    # flatter policy (scale < 1) puts more mass on the actual tokens than the reference (z0 > 0) and a sharper one
    # less (raw z0 < 0, so the clamp at 0 applies).
    with torch.no_grad():
        policy.model.norm.weight.mul_(policy_logit_scale)
    return policy.eval(), reference.eval()


@pytest.mark.parametrize("policy_logit_scale, z0_positive", [(0.5, True), (2.0, False)])
def test_kto_loss_matches_trl(tiny_model_path, tokenizer, tmp_path, policy_logit_scale, z0_positive):
    policy, reference = load_models(tiny_model_path, policy_logit_scale)
    dataset = Dataset.from_dict({"prompt": [r[0] for r in ROWS], "completion": [r[1] for r in ROWS], "label": [r[2] for r in ROWS]})
    config = trl.KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(ROWS),  # one batch, so the KL rotation spans the whole dataset
        beta=BETA,
        desirable_weight=DESIRABLE_WEIGHT,
        undesirable_weight=UNDESIRABLE_WEIGHT,
        max_length=64,
        precompute_ref_log_probs=False,
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,  # KTOConfig defaults to bf16; keep float32 so the comparison is tight
        gradient_checkpointing=False,
        report_to=[],
    )
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].any() and not batch["label"].all()

    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, batch)
    # `_compute_loss` files its metrics under "eval" because the policy is in eval mode
    trl_metrics = trainer._metrics["eval"]

    def logps(model, prefix=""):
        return completion_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"])

    policy_kl_logps, reference_kl_logps = logps(policy, "KL_"), logps(reference, "KL_")
    ours = kto_loss(
        policy_logps=logps(policy),
        reference_logps=logps(reference),
        desirable=batch["label"],
        policy_mismatched_logps=policy_kl_logps,
        reference_mismatched_logps=reference_kl_logps,
        beta=BETA,
        desirable_weight=DESIRABLE_WEIGHT,
        undesirable_weight=UNDESIRABLE_WEIGHT,
    )

    raw_z0 = (policy_kl_logps - reference_kl_logps).mean()
    assert (raw_z0 > 0) == z0_positive  # the case exercises the intended branch of the clamp
    assert ours.z0.item() == pytest.approx(trl_metrics["kl"][-1], abs=1e-5)
    assert torch.allclose(ours.loss, trl_loss, atol=1e-5), (ours.loss.item(), trl_loss.item())
    desirable = batch["label"].bool()
    assert ours.rewards[desirable].mean().item() == pytest.approx(trl_metrics["rewards/chosen"][-1], abs=1e-5)
    assert ours.rewards[~desirable].mean().item() == pytest.approx(trl_metrics["rewards/rejected"][-1], abs=1e-5)


def test_our_kto_batch_gives_trls_loss_and_z0(tiny_model_path, tokenizer, tmp_path):
    """A batch built by our data code (steering examples, whole prompt groups, our batching) run through
    TRL's KTOTrainer, which pairs each prompt with the previous row's completion for z0, gives the loss
    and z0 of our hybrid step (kto_only, TRL's plain row mean), which takes z0 from the batch's own rows:
    on our data TRL's mismatched pairs are those rows, permuted."""
    from distalign_ray.config import FinetuneConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.data.steering import build_steering_examples, prepare_steering_vocab
    from distalign_ray.scoring import CompletionScorer
    from distalign_ray.training.loop import batches
    from distalign_ray.training.objective import fill_kto_reference, hybrid_step_loss
    from distalign_ray.training.stages import group_by_prompt

    spec = load_dataset("gender-us-real").subset(3)
    vocab = prepare_steering_vocab(tokenizer, spec)
    groups = group_by_prompt(build_steering_examples(spec, tokenizer, vocab, ["attribute_0"]))
    batch = batches(groups, 2, seed=3, rank=0, world=1)[0]  # 2 prompts x K x K rows
    completions = [[vocab.token_ids[e.steering_index], *e.answer_ids] for e in batch]
    # TRL's rule (kto_trainer: completions rotated by +1 within a batch) yields the batch's own pairs
    rows = sorted((tuple(e.prompt_ids), tuple(c)) for e, c in zip(batch, completions))
    trl_pairs = sorted((tuple(e.prompt_ids), tuple(c)) for e, c in zip(batch, completions[-1:] + completions[:-1]))
    assert trl_pairs == rows

    cfg = FinetuneConfig(model=tiny_model_path, loss_mode="kto_only", beta=BETA, kto_balance="rows")
    policy, reference = load_models(tiny_model_path, 2.0)  # on these rows the sharper policy gives raw z0 > 0
    pad = tokenizer.pad_token_id
    fill_kto_reference(CompletionScorer(reference, pad), batch, vocab.token_ids, cfg)
    with torch.no_grad():
        ours = hybrid_step_loss(CompletionScorer(policy, pad), batch, vocab.token_ids, cfg)

    texts = {
        "prompt": [tokenizer.decode(e.prompt_ids) for e in batch],
        "completion": [tokenizer.decode(c[:-1]) for c in completions],  # TRL appends the EOS itself
        "label": [e.desirable for e in batch],
    }
    config = trl.KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(batch),
        beta=BETA,
        max_length=256,
        precompute_ref_log_probs=False,
        remove_unused_columns=False,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
    )
    trainer = trl.KTOTrainer(
        model=policy, ref_model=reference, args=config, train_dataset=Dataset.from_dict(texts), processing_class=tokenizer
    )
    trl_batch = next(iter(trainer.get_train_dataloader()))
    # TRL tokenised our texts back to our token ids
    trl_rows = sorted(tuple(ids[mask.bool()].tolist()) for ids, mask in zip(trl_batch["input_ids"], trl_batch["attention_mask"]))
    assert trl_rows == sorted(tuple(e.prompt_ids + c) for e, c in zip(batch, completions))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, trl_batch)
    trl_z0 = trainer._metrics["eval"]["kl"][-1]
    assert trl_z0 > 0  # the clamp does not hide a difference
    assert ours["kto_z0"].item() == pytest.approx(trl_z0, abs=1e-5)
    assert ours["kto"].item() == pytest.approx(trl_loss.item(), abs=1e-5)
