"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from distalign_ray.losses import HybridLossWeights, combine_losses, kto_loss, sft_loss, steering_kl_loss


def test_steering_kl_renormalised_over_ids():
    logits = torch.tensor([[math.log(1.0), math.log(3.0), 5.0]])  # vocab of 3, ids 0 and 1 steer
    target = torch.tensor([[0.5, 0.5]])
    # model over ids: [0.25, 0.75]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert steering_kl_loss(logits, torch.tensor([0, 1]), target).item() == pytest.approx(expected, rel=1e-6)


def test_steering_kl_full_vocabulary_variant():
    logits = torch.tensor([[math.log(1.0), math.log(3.0), math.log(4.0)]])
    target = torch.tensor([[0.5, 0.5]])
    # full softmax: [1/8, 3/8, 4/8]
    expected = 0.5 * math.log(0.5 / 0.125) + 0.5 * math.log(0.5 / 0.375)
    got = steering_kl_loss(logits, torch.tensor([0, 1]), target, normalization="vocab").item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_steering_kl_zero_target_terms_and_batch_mean():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    target = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    row0 = math.log(1 / 0.5)
    row1 = 0.25 * math.log(0.25 / 0.25) + 0.75 * math.log(0.75 / 0.75)
    assert steering_kl_loss(logits, torch.tensor([0, 1]), target).item() == pytest.approx((row0 + row1) / 2)
    assert steering_kl_loss(logits[1:], torch.tensor([0, 1]), target[1:]).item() == pytest.approx(0.0, abs=1e-7)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_computed_with_positive_reference_point():
    policy = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([-1.5, -1.0, -3.0])
    desirable = torch.tensor([True, False, True])
    mismatched_policy = torch.tensor([-4.0, -5.0, -6.0])
    mismatched_reference = torch.tensor([-5.0, -5.0, -6.5])
    beta, wd, wu = 0.5, 1.2, 0.8
    z0 = (1.0 + 0.0 + 0.5) / 3
    ratios = [0.5, -1.0, 0.0]
    expected = [
        wd * (1 - _sigmoid(beta * (ratios[0] - z0))),
        wu * (1 - _sigmoid(beta * (z0 - ratios[1]))),
        wd * (1 - _sigmoid(beta * (ratios[2] - z0))),
    ]
    out = kto_loss(policy, reference, desirable, mismatched_policy, mismatched_reference, beta, wd, wu)
    assert out.z0.item() == pytest.approx(z0)
    assert out.per_example.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    mismatched_policy = torch.tensor([-9.0, -9.0], requires_grad=True)
    out = kto_loss(policy, torch.tensor([-1.0, -2.0]), torch.tensor([True, False]), mismatched_policy, torch.tensor([-1.0, -1.0]))
    assert out.z0.item() == 0.0  # raw z0 = -8, clamped
    assert out.loss.item() == pytest.approx(0.5)  # ratios 0, z0 0: both losses 1 - sigmoid(0)
    out.loss.backward()
    assert mismatched_policy.grad is None  # z0 carries no gradient
    assert policy.grad is not None


def test_sft_is_mean_of_per_example_token_means():
    token_logps = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(token_logps, mask).item() == pytest.approx((2.0 + 2.0) / 2)


def test_sft_token_mean_weighs_every_completion_token_alike():
    token_logps = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(token_logps, mask, "token").item() == pytest.approx((1.0 + 3.0 + 2.0) / 3)


@pytest.mark.parametrize(("reduction", "short_share"), [("token", 0.5), ("example", 0.8)])
def test_sft_reduction_decides_the_fitted_class_shares_of_answers_of_unequal_length(reduction, short_share):
    """Half the answers are one token long, half four (a first token, then three the model is sure of).
    Fitting the first-token distribution by gradient descent: the token mean recovers the 50/50 shares;
    the example mean weighs a first token by 1/length and settles at 1 : 1/4, i.e. 0.8 for the short class."""
    logits = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=2.0)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    for _ in range(500):
        first = logits.log_softmax(-1)
        token_logps = torch.stack([torch.stack([first[0], *[torch.tensor(0.0)] * 3]), torch.stack([first[1], *[torch.tensor(0.0)] * 3])])
        optimizer.zero_grad()
        sft_loss(token_logps, mask, reduction).backward()
        optimizer.step()
    assert logits.softmax(-1)[0].item() == pytest.approx(short_share, abs=1e-3)


def test_hybrid_weights_and_ablations():
    kl, kto = torch.tensor(2.0), torch.tensor(3.0)
    weights = HybridLossWeights(kl_weight=0.5, kto_weight=2.0)
    assert combine_losses(weights, kl, kto).item() == pytest.approx(7.0)  # hybrid
    assert combine_losses(weights, kl, None).item() == pytest.approx(1.0)  # kl_only
    assert combine_losses(weights, None, kto).item() == pytest.approx(6.0)  # kto_only
    with pytest.raises(ValueError):
        combine_losses(weights, None, None)


def test_losses_package_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, distalign_ray.losses; assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dpo_hand_computed():
    from distalign_ray.losses import dpo_loss

    beta = 0.2
    loss, margins = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0]), beta
    )
    m = [(-1.0 + 1.5) - (-3.0 + 2.5), (-2.0 + 2.0) - (-1.0 + 2.0)]  # 1.0, -1.0
    expected = [-math.log(_sigmoid(beta * x)) for x in m]
    assert margins.tolist() == pytest.approx([beta * x for x in m])
    assert loss.item() == pytest.approx(sum(expected) / 2)


def _row_weights(balance: str, desirable: torch.Tensor) -> torch.Tensor:
    """d loss / d log-ratio of each row, at log-ratio 0 and z0 0 (every row's sigmoid slope is equal)."""
    policy = torch.zeros(len(desirable), requires_grad=True)
    zeros = torch.zeros(len(desirable))
    kto_loss(policy, zeros, desirable, zeros, zeros, balance=balance).loss.backward()
    return policy.grad.abs()


def test_kto_pairs_balance_gives_desirable_and_undesirable_rows_equal_weight():
    """The cause of issue 11's collapse: a steering group of K = 3 classes has 3 desirable and 6
    undesirable rows; the plain mean gives the undesirable rows twice the desirable rows' weight,
    pushing every answer down. `pairs` (the default) weighs both kinds equally, as the paper's
    one-to-one (desirable, undesirable) pairs do."""
    from distalign_ray.config import FinetuneConfig

    k = 3
    desirable = torch.tensor([j == c for j in range(k) for c in range(k)])
    weights = _row_weights(FinetuneConfig().kto_balance, desirable)
    assert weights[desirable].sum().item() == pytest.approx(weights[~desirable].sum().item())
    plain = _row_weights("rows", desirable)
    assert plain[~desirable].sum().item() == pytest.approx((k - 1) * plain[desirable].sum().item())


def test_kto_balances_agree_for_two_classes():
    policy = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    reference = torch.tensor([-1.5, -1.0, -3.0, -1.0])
    desirable = torch.tensor([True, False, False, True])
    mismatched = (torch.tensor([-4.0, -5.0, -6.0, -2.0]), torch.tensor([-5.0, -5.0, -6.5, -2.0]))
    rows = kto_loss(policy, reference, desirable, *mismatched, balance="rows").loss
    pairs = kto_loss(policy, reference, desirable, *mismatched, balance="pairs").loss
    assert pairs.item() == pytest.approx(rows.item(), rel=1e-6)
