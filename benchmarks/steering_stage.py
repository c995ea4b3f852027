"""How the steering methods' stage 2 fits a dataset's targets: the steering readout MAE on the training
prompts every `--every` optimizer steps, for one learning rate, budget and batch order.

Trains as `distalign finetune` does (the same stages, batches, losses, LoRA and clipping; one process,
no Ray, on CPU), with a constant learning rate after the SFT stage, or the loop's warm-up and cosine
schedule with `--schedule cosine`. `--order` shifts the batch-shuffle seeds (0: the order a training
with `--seed` uses), to show how much a result depends on it. Chooses `compare`'s training budget.

Prints a table (not a test); nothing is written.

Usage: python benchmarks/steering_stage.py [--dataset gender-uk-real] [--method kl_only] [--lr 2e-3]
           [--beta 0.1] [--steps 70] [--order 0] [--seed 0] [--schedule constant]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch

    from distalign_ray.config import FinetuneConfig
    from distalign_ray.data.specs import load_dataset
    from distalign_ray.data.steering import prepare_steering_vocab
    from distalign_ray.models import load_model, load_tokenizer, resolve_model
    from distalign_ray.scoring import CompletionScorer
    from distalign_ray.training.budget import plan_budget
    from distalign_ray.training.loop import batches, build_lora, lr_factor, optimizer_step
    from distalign_ray.training.objective import steering_readout
    from distalign_ray.training.stages import build_stages, validation_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="gender-uk-real")
    parser.add_argument("--method", default="kl_only", choices=["hybrid", "kl_only", "kto_only"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=70, help="stage-2 optimizer steps")
    parser.add_argument("--order", type=int, default=0, help="added to the batch-shuffle seeds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--every", type=int, default=7)
    args = parser.parse_args()

    cfg = FinetuneConfig(loss_mode=args.method, lr=args.lr, beta=args.beta, seed=args.seed, num_workers=0)
    spec = load_dataset(args.dataset)
    torch.manual_seed(cfg.seed)  # as the loop's rank 0
    ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(ref)
    vocab = prepare_steering_vocab(tokenizer, spec, cfg.steering_tokens)
    model = build_lora(load_model(ref), cfg, vocab.token_ids if vocab.added_special_tokens else None)
    model.train()
    scorer = CompletionScorer(model, tokenizer.pad_token_id)
    budget = plan_budget(cfg, spec)
    sft, align = build_stages(cfg, spec, tokenizer, vocab, scorer, budget)
    prompts, targets = zip(*validation_set(spec, tokenizer, cfg.templates))
    targets = torch.tensor(targets)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def readout_mae() -> float:
        model.eval()
        probs = steering_readout(model, list(prompts), vocab.token_ids, tokenizer.pad_token_id).probs
        model.train()
        return float((probs - targets).abs().mean())

    print(f"{args.dataset}, {args.method}, lr {args.lr:g}, {args.schedule}, batch order {args.order}, seed {args.seed}")
    print("| stage | step | loss | readout MAE |\n|---|---|---|---|")
    plan_index, started = 0, time.time()
    for stage, steps, lr in ((sft, budget.sft_steps, cfg.sft_lr), (align, args.steps, args.lr)):
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
        constant = stage is sft or args.schedule == "constant"
        factor = (lambda step: 1.0) if constant else lr_factor(steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        if stage.prepare is not None:
            stage.prepare(scorer)
        step = 0
        while step < steps:
            for batch in batches(stage.groups, budget.prompts_per_batch, cfg.seed * 1000 + plan_index + args.order, 0, 1):
                loss = stage.step(scorer, batch)["loss"]
                optimizer_step(loss, trainable, optimizer, scheduler, cfg.max_grad_norm)
                step += 1
                if step % args.every == 0 or step == steps:
                    print(f"| {stage.name} | {step} | {loss.item():.4f} | {readout_mae():.3f} |", flush=True)
                if step == steps:
                    break
            plan_index += 1
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
