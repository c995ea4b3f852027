"""Distribution metrics over contexts: MAE, KL, Jensen-Shannon divergence, bootstrap CIs, noise floor.

Per context o with target t_o and estimate q_o over K classes:
  MAE_o = (1/K) sum_k |t_ok - q_ok|         (for two classes this is |t_male - q_male|)
  KL_o  = sum_{k: t_ok > 0} t_ok ln(t_ok / (q_ok + 1e-10))
  JS_o  = (KL(t || m) + KL(q || m)) / 2, m = (t + q) / 2   (the divergence, natural log; not the distance)
and each metric is the mean over contexts. q_o comes from matched answers only; a context with no
matched answer gets q_o = 0 (it is counted as fully wrong, not skipped).

The sampled MAE is biased upward (|t - q| grows with q's noise), so the bootstrap distribution of the
resampled MAE sits above the estimate and a percentile interval lies at or above it. The interval
reported is the basic (reverse-percentile) bootstrap interval, [2 MAE - q97.5, 2 MAE - q2.5] clamped at
0, which subtracts that bias, beside `mae_debiased` = 2 MAE - mean(resampled MAE). `noise_p_value` is
the share of a calibrated sampler's MAEs (same targets and sample sizes) at or above the observed MAE:
a "within sampling noise" claim needs it to be at least 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-10


def proportions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class shares among matched labels (-1 = unmatched); all zeros when nothing matched."""
    matched = labels[labels >= 0]
    if matched.size == 0:
        return np.zeros(num_classes)
    return np.bincount(matched, minlength=num_classes) / matched.size


def mae(targets: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    return np.abs(targets - estimates).mean(-1)


def kl_divergence(targets: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    ratio = np.where(targets > 0, targets / (estimates + EPS), 1.0)
    return (targets * np.log(ratio)).sum(-1)


def js_divergence(targets: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    mid = (targets + estimates) / 2

    def kl(a, b):
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0).sum(-1)

    return (kl(targets, mid) + kl(estimates, mid)) / 2


@dataclass
class DistributionReport:
    estimates: np.ndarray  # [contexts, K]
    mae_per_context: np.ndarray
    mae: float
    mae_ci_low: float
    mae_ci_high: float
    kl: float
    js: float
    unmatched_rate: float
    noise_floor_mae: float
    samples_per_context: np.ndarray
    matched_per_context: np.ndarray
    mae_debiased: float  # bootstrap bias-corrected MAE, clamped at 0
    noise_p_value: float  # P(calibrated sampler's MAE >= this MAE); nan without sampling

    def metrics(self) -> dict[str, float]:
        return {
            "mae": self.mae,
            "mae_ci_low": self.mae_ci_low,
            "mae_ci_high": self.mae_ci_high,
            "kl": self.kl,
            "js": self.js,
            "unmatched_rate": self.unmatched_rate,
            "noise_floor_mae": self.noise_floor_mae,
            "mae_debiased": self.mae_debiased,
            "noise_p_value": self.noise_p_value,
        }


def bootstrap_mae(labels: list[np.ndarray], targets: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Mean MAE of each resample: every context's label list is resampled with replacement at its
    own length (unmatched answers stay in the pool, as in the reference protocol)."""
    k = targets.shape[1]
    per_context = np.zeros((resamples, len(labels)))
    for o, context_labels in enumerate(labels):
        n = context_labels.size
        if n == 0:
            per_context[:, o] = targets[o].mean()
            continue
        draws = context_labels[rng.integers(0, n, size=(resamples, n))]
        counts = np.stack([(draws == c).sum(-1) for c in range(k)], axis=-1).astype(float)
        matched = counts.sum(-1, keepdims=True)
        shares = np.divide(counts, matched, out=np.zeros_like(counts), where=matched > 0)
        per_context[:, o] = np.abs(shares - targets[o]).mean(-1)
    return per_context.mean(-1)


def calibrated_maes(targets: np.ndarray, sizes: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """MAEs of a perfectly calibrated sampler with these per-context sample sizes, one per simulation
    (their mean is the noise floor)."""
    totals = np.zeros(resamples)
    for o, n in enumerate(sizes):
        n = int(max(n, 1))
        draws = rng.multinomial(n, targets[o], size=resamples) / n
        totals += np.abs(draws - targets[o]).mean(-1)
    return totals / len(sizes)


def distribution_report(labels: list[np.ndarray], targets: np.ndarray, resamples: int = 1000, seed: int = 0) -> DistributionReport:
    """`labels[o]`: class index per sample of context o (-1 = unmatched)."""
    k = targets.shape[1]
    estimates = np.stack([proportions(l, k) for l in labels])
    per_context = mae(targets, estimates)
    rng = np.random.default_rng(seed)
    boot = bootstrap_mae(labels, targets, resamples, rng)
    total = sum(l.size for l in labels)
    unmatched = sum(int((l < 0).sum()) for l in labels)
    matched = np.array([int((l >= 0).sum()) for l in labels])
    value = float(per_context.mean())
    calibrated = calibrated_maes(targets, np.where(matched > 0, matched, [l.size for l in labels]), resamples, rng)
    return DistributionReport(
        estimates=estimates,
        mae_per_context=per_context,
        mae=value,
        mae_ci_low=max(0.0, 2 * value - float(np.percentile(boot, 97.5))),
        mae_ci_high=max(0.0, 2 * value - float(np.percentile(boot, 2.5))),
        kl=float(kl_divergence(targets, estimates).mean()),
        js=float(js_divergence(targets, estimates).mean()),
        unmatched_rate=unmatched / total if total else 0.0,
        noise_floor_mae=float(calibrated.mean()),
        samples_per_context=np.array([l.size for l in labels]),
        matched_per_context=matched,
        mae_debiased=max(0.0, 2 * value - float(boot.mean())),
        noise_p_value=float((calibrated >= value).mean()),
    )


def readout_report(estimates: np.ndarray, targets: np.ndarray) -> DistributionReport:
    """Metrics of a sampling-free estimate: no sampling noise, so the CI collapses to the value."""
    per_context = mae(targets, estimates)
    value = float(per_context.mean())
    n = np.zeros(len(targets), dtype=int)
    return DistributionReport(
        estimates=estimates,
        mae_per_context=per_context,
        mae=value,
        mae_ci_low=value,
        mae_ci_high=value,
        kl=float(kl_divergence(targets, estimates).mean()),
        js=float(js_divergence(targets, estimates).mean()),
        unmatched_rate=0.0,
        noise_floor_mae=0.0,
        samples_per_context=n,
        matched_per_context=n,
        mae_debiased=value,
        noise_p_value=float("nan"),
    )


def engine_distance(labels_a: list[np.ndarray], labels_b: list[np.ndarray], num_classes: int) -> float:
    """Mean over contexts of the MAE between two estimators' class shares (matched answers only)."""
    return float(np.mean([np.abs(proportions(a, num_classes) - proportions(b, num_classes)).mean() for a, b in zip(labels_a, labels_b)]))


def same_distribution_bound(
    labels_a: list[np.ndarray], labels_b: list[np.ndarray], num_classes: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> float:
    """Bootstrap bound on `engine_distance` when both sample sets come from one distribution: pool each
    context's labels, redraw two sets of the original sizes, take the `level` quantile of the distance."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for a, b in zip(labels_a, labels_b):
        pool = np.concatenate([a, b])
        for r in range(resamples):
            picked = pool[rng.integers(0, pool.size, size=a.size + b.size)]
            draws[r] += np.abs(proportions(picked[: a.size], num_classes) - proportions(picked[a.size :], num_classes)).mean()
    return float(np.quantile(draws / len(labels_a), level))
