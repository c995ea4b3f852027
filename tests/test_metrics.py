"""Classification, metrics, bootstrap and noise floor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distalign_ray.evaluation.classify import LexicalClassifier
from distalign_ray.evaluation.metrics import (
    calibrated_maes,
    distribution_report,
    js_divergence,
    kl_divergence,
    mae,
    proportions,
    readout_report,
)

GENDER = LexicalClassifier(["male", "female"], {"male": ["man"], "female": ["woman"]})
RACE = LexicalClassifier(["white", "black or african american", "asian"], {"black or african american": ["black", "african american"]})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Male", 0),
        ("female", 1),
        ("FEMALE.", 1),
        ("The answer is male, not female", 1),  # last mention wins
        ("female? No: male", 0),
        ("This person is a woman", 1),
        ("a man", 0),
        ("Males", 0),  # plurals
        ("Men.", 0),
        ("women", 1),
        ("Male or Female", None),  # the options echoed back are not a choice
        ("male/female", None),
        ("M/F", None),
        ("Male, female, or other? I'd say female.", 1),  # an echo, then the choice
        ("Male or Female: Male", 0),
        ("females and males", None),
        ("Malevolent", None),
        ("Sure!", None),
        ("", None),
    ],
)
def test_gender_classification(text, expected):
    assert GENDER(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Black or African American", 1),  # one category whose name contains "or"
        ("asian", 2),
        ("Asians", 2),
        ("White, or maybe Black", 1),
        ("White, Black or African American, or Asian", None),  # the three options echoed
        ("Caucasian", None),
    ],
)
def test_multiword_classification(text, expected):
    assert RACE(text) == expected


def test_hand_computed_metrics():
    targets = np.array([[0.8, 0.2], [0.5, 0.5]])
    estimates = np.array([[0.6, 0.4], [0.5, 0.5]])
    assert mae(targets, estimates).tolist() == pytest.approx([0.2, 0.0])
    assert kl_divergence(targets, estimates)[0] == pytest.approx(0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4))
    m = np.array([0.7, 0.3])
    js = 0.5 * sum(t * math.log(t / mm) for t, mm in zip([0.8, 0.2], m)) + 0.5 * sum(q * math.log(q / mm) for q, mm in zip([0.6, 0.4], m))
    assert js_divergence(targets, estimates)[0] == pytest.approx(js)
    assert js_divergence(targets, estimates)[1] == pytest.approx(0.0)


def test_proportions_ignore_unmatched_and_empty_is_zero():
    assert proportions(np.array([0, 0, 1, -1]), 2).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert proportions(np.array([-1, -1]), 2).tolist() == [0.0, 0.0]


def test_report_counts_unmatched_and_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    targets = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    labels = [rng.choice([0, 1, -1], size=60, p=[0.6, 0.3, 0.1]) for _ in targets]
    report = distribution_report(labels, targets, resamples=500, seed=3)
    again = distribution_report(labels, targets, resamples=500, seed=3)
    assert report.metrics() == again.metrics()
    assert report.mae_ci_low <= report.mae_debiased <= report.mae_ci_high
    assert report.unmatched_rate == pytest.approx(sum(int((l < 0).sum()) for l in labels) / 180)
    assert report.samples_per_context.tolist() == [60, 60, 60]


def test_context_without_any_match_counts_as_fully_wrong():
    report = distribution_report([np.array([-1, -1]), np.array([0, 1])], np.array([[0.5, 0.5], [0.5, 0.5]]), 100, 0)
    assert report.mae_per_context.tolist() == pytest.approx([0.5, 0.0])
    assert report.unmatched_rate == 0.5


def test_noise_floor_matches_binomial_expectation():
    rng = np.random.default_rng(0)
    # E|p_hat - p| for n=100, p=0.5 is about 0.0398 (the method doc's simulated 0.040)
    floor = calibrated_maes(np.array([[0.5, 0.5]] * 20), np.array([100] * 20), 2000, rng).mean()
    assert floor == pytest.approx(0.0398, abs=0.002)
    assert calibrated_maes(np.array([[0.5, 0.5]]), np.array([400]), 2000, rng).mean() < floor


def test_readout_report_has_no_sampling_noise():
    report = readout_report(np.array([[0.7, 0.3]]), np.array([[0.8, 0.2]]))
    assert report.mae == report.mae_ci_low == report.mae_ci_high == pytest.approx(0.1)
    assert report.noise_floor_mae == 0.0


def _simulated_reports(true_shares: np.ndarray, targets: np.ndarray, n: int, runs: int, seed: int):
    rng = np.random.default_rng(seed)
    for run in range(runs):
        labels = [rng.choice(len(p), size=n, p=p) for p in true_shares]
        yield distribution_report(labels, targets, resamples=400, seed=run)


TARGETS = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7], [0.6, 0.4]] * 4)


@pytest.mark.parametrize("offset", [0.02, 0.05, 0.1])
def test_mae_interval_covers_the_true_mae(offset):
    """A sampler whose true shares miss the targets by `offset` (true MAE = offset), 100 samples per
    context: the basic bootstrap interval covers the true MAE in 86-89% of simulated estimates here
    (the percentile interval of the upward-biased MAE: 0%, 58%, 94%); a 0.1 miss always fails the noise test."""
    true_shares = np.clip(TARGETS + np.array([-offset, offset]), 0, 1)
    reports = list(_simulated_reports(true_shares, TARGETS, 100, 200, seed=1))
    coverage = np.mean([r.mae_ci_low <= offset <= r.mae_ci_high for r in reports])
    assert coverage >= 0.8, coverage
    if offset == 0.1:
        assert all(r.noise_p_value < 0.05 for r in reports)


def test_calibrated_sampler_is_within_noise():
    """At true MAE 0 no bootstrap interval of |t - q| covers well (the bias is the whole estimate); the
    noise test is the tool there: a calibrated sampler fails it at about the 5% level."""
    reports = list(_simulated_reports(TARGETS, TARGETS, 100, 200, seed=1))
    assert np.mean([r.noise_p_value < 0.05 for r in reports]) <= 0.1
    assert np.mean([r.mae_debiased for r in reports]) < 0.7 * np.mean([r.mae for r in reports])  # 0.020 vs 0.035 here
