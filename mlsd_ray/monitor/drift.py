"""Drift and skew tests of logged predictions against the model version's training reference.

Per feature: the population stability index (PSI) over quantile bins of the reference, and the
two-sample Kolmogorov-Smirnov test (SciPy). A feature drifts when both agree: PSI at least
`psi_threshold` (the shift is large) and KS p-value below `ks_alpha` (it is not chance).
Skew: a chi-squared test (SciPy) of the predicted-class counts against the training label
distribution, flagged when p < `chi2_alpha` and the total variation distance reaches
`min_class_shift`. Confidence: mean confidence at least `confidence_drop` below the reference's
(validation predictions at training time) with a KS p-value below `ks_alpha`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from mlsd_ray.config import MonitorConfig

NO_DATA, TOO_FEW, DRIFT, NO_DRIFT = "no data", "too few", "drift", "no drift"


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference`, on reference quantiles."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant reference: everything else is a shift
        edges = np.array([edges[0] - 1e-9, edges[0] + 1e-9])
    edges[0], edges[-1] = -np.inf, np.inf
    expected = np.histogram(reference, edges)[0] / len(reference)
    actual = np.histogram(current, edges)[0] / len(current)
    # A floor keeps empty bins finite (the usual convention; 1e-4 = 0.01 % of the mass).
    expected, actual = np.clip(expected, 1e-4, None), np.clip(actual, 1e-4, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_drift(reference: np.ndarray, current: np.ndarray, cfg: MonitorConfig) -> dict:
    """PSI and KS of one feature, and whether it drifted."""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    test = stats.ks_2samp(reference, current)
    value = psi(reference, current, cfg.bins)
    return {"psi": round(value, 4), "ks_statistic": round(float(test.statistic), 4),
            "ks_pvalue": float(test.pvalue),
            "reference_mean": round(float(reference.mean()), 4),
            "current_mean": round(float(current.mean()), 4),
            "drifted": bool(value >= cfg.psi_threshold and test.pvalue < cfg.ks_alpha)}


def class_skew(predicted: pd.Series, label_counts: dict[str, int], cfg: MonitorConfig) -> dict:
    """Chi-squared test of predicted classes against the training label distribution."""
    names = list(label_counts)
    observed = predicted.astype(str).value_counts().reindex(names, fill_value=0).to_numpy()
    expected_share = np.array([label_counts[n] for n in names], float)
    expected_share /= expected_share.sum()
    present = expected_share > 0  # a class absent from training cannot be tested against
    test = stats.chisquare(observed[present],
                           expected_share[present] * observed[present].sum())
    share = observed / max(observed.sum(), 1)
    distance = 0.5 * float(np.abs(share - expected_share).sum())
    return {"chi2": round(float(test.statistic), 3), "pvalue": float(test.pvalue),
            "total_variation": round(distance, 4),
            "predicted_share": {n: round(float(s), 4) for n, s in zip(names, share)},
            "training_share": {n: round(float(s), 4) for n, s in zip(names, expected_share)},
            "drifted": bool(test.pvalue < cfg.chi2_alpha and distance >= cfg.min_class_shift)}


def confidence_shift(reference: list[float], current: np.ndarray, cfg: MonitorConfig) -> dict:
    """Has mean confidence dropped against the reference's?"""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    test = stats.ks_2samp(reference, current)
    drop = float(reference.mean() - current.mean())
    return {"reference_mean": round(float(reference.mean()), 4),
            "current_mean": round(float(current.mean()), 4), "drop": round(drop, 4),
            "ks_pvalue": float(test.pvalue),
            "drifted": bool(drop >= cfg.confidence_drop and test.pvalue < cfg.ks_alpha)}


def check_model(rows: pd.DataFrame, reference: dict, cfg: MonitorConfig) -> dict:
    """All tests for the rows one model version served, against that version's reference."""
    result: dict = {"rows": len(rows), "features": {}, "drifted_features": []}
    if len(rows) < cfg.min_samples:
        result["verdict"] = TOO_FEW
        result["note"] = (f"{len(rows)} predictions; at least {cfg.min_samples} "
                          "(monitor.min_samples) are needed for a test")
        return result
    profile = reference.get("features") or {}
    if not profile:
        result["note"] = ("this model's checkpoint has no reference features (it was trained "
                          "before they were recorded): only skew is tested")
    for name, values in profile.items():
        if name in rows:
            result["features"][name] = feature_drift(values, rows[name].to_numpy(), cfg)
    result["drifted_features"] = [n for n, f in result["features"].items() if f["drifted"]]
    if reference.get("label_counts"):
        result["skew"] = class_skew(rows["predicted_class"], reference["label_counts"], cfg)
    if reference.get("confidence"):
        result["confidence"] = confidence_shift(reference["confidence"],
                                                rows["confidence"].to_numpy(), cfg)
    flags = [bool(result["drifted_features"]), result.get("skew", {}).get("drifted", False),
             result.get("confidence", {}).get("drifted", False)]
    result["verdict"] = DRIFT if any(flags) else NO_DRIFT
    result["drift_score"] = max((f["psi"] for f in result["features"].values()), default=0.0)
    return result


def describe(result: dict) -> str:
    """One line naming what drifted, for the verdict."""
    if result["verdict"] != DRIFT:
        return result["verdict"]
    parts = []
    if result["drifted_features"]:
        shown = ", ".join(f"{n} (PSI {result['features'][n]['psi']:.2f})"
                          for n in result["drifted_features"])
        parts.append(f"features drifted: {shown}")
    skew = result.get("skew", {})
    if skew.get("drifted"):
        parts.append(f"predicted classes skewed (chi2 p={skew['pvalue']:.1e}, TV distance "
                     f"{skew['total_variation']:.2f})")
    confidence = result.get("confidence", {})
    if confidence.get("drifted"):
        parts.append(f"confidence fell {confidence['reference_mean']:.3f} -> "
                     f"{confidence['current_mean']:.3f}")
    return "drift: " + "; ".join(parts)
