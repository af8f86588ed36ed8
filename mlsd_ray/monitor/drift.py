"""Drift and skew tests of logged predictions against the model version's training reference.

The tests are the same for every task; the reference (in the checkpoint's reference.json)
says what there is to test, and the task decides what it holds:

- `features` (numbers): the population stability index (PSI) over quantile bins of the
  reference, and the two-sample Kolmogorov-Smirnov test (SciPy). A feature drifts when both
  agree: PSI at least `psi_threshold` (the shift is large) and KS p-value below `ks_alpha` (it
  is not chance). Images: summary features of each image; tables: the numeric columns.
- `categories` (tables): a chi-squared test of each categorical column's values against its
  training counts (values never seen in training counted apart), flagged like skew.
- `missing_rate` (tables): the share of missing values per column, flagged when it moved by at
  least `missing_shift` and a binomial test gives p < `ks_alpha`.
- `label_counts`: skew, a chi-squared test of the predicted-class counts against the reference
  distribution, flagged when p < `chi2_alpha` and the total variation distance reaches
  `min_class_shift`.
- `confidence`: mean confidence at least `confidence_drop` below the reference's (validation
  predictions at training time) with a KS p-value below `ks_alpha`.
- `scores` (tables): the model's output per row (a positive-class score, the top class's
  probability, or the predicted value), tested like a feature.

`log_prefix` names where a reference column sits in the prediction log (`input.amount` for
the column `amount`), so that input columns never collide with the log's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from mlsd_ray.core.config import MonitorConfig

__all__ = ["category_shift", "CategoryShift", "check_model", "class_skew", "ClassSkew",
           "confidence_shift", "ConfidenceShift", "feature_drift", "FeatureDrift", "missing_shift",
           "MissingShift", "ModelDrift", "psi"]

NO_DATA, TOO_FEW, DRIFT, NO_DRIFT = "no data", "too few", "drift", "no drift"


@dataclass(frozen=True)
class FeatureDrift:
    """One numeric feature (or the model's scores) now against training: PSI and KS."""

    psi: float
    ks_statistic: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float
    drifted: bool


@dataclass(frozen=True)
class ClassSkew:
    """Predicted classes against the training labels: chi-squared and total variation."""

    chi2: float
    pvalue: float
    total_variation: float
    predicted_share: dict[str, float]
    training_share: dict[str, float]
    drifted: bool


@dataclass(frozen=True)
class CategoryShift:
    """A categorical column's values against its training counts (unseen values apart)."""

    chi2: float
    pvalue: float
    total_variation: float
    current_share: dict[str, float]
    drifted: bool


@dataclass(frozen=True)
class MissingShift:
    """A column's share of missing values now against training: a binomial test."""

    reference_rate: float
    current_rate: float
    pvalue: float
    drifted: bool


@dataclass(frozen=True)
class ConfidenceShift:
    """Mean confidence now against validation's at training time."""

    reference_mean: float
    current_mean: float
    drop: float
    ks_pvalue: float
    drifted: bool


@dataclass
class ModelDrift:
    """Every test of the rows one model version served, against that version's reference.

    `verdict` is DRIFT when any test flags, NO_DRIFT when none does, TOO_FEW below
    `monitor.min_samples` rows (then no test ran, and `note` says so)."""

    rows: int
    verdict: str = NO_DRIFT
    model_version: str = ""
    features: dict[str, FeatureDrift] = field(default_factory=dict)
    categories: dict[str, CategoryShift] = field(default_factory=dict)
    missing: dict[str, MissingShift] = field(default_factory=dict)
    skew: ClassSkew | None = None
    confidence: ConfidenceShift | None = None
    score: FeatureDrift | None = None
    note: str | None = None

    @property
    def drifted_features(self) -> list[str]:
        """Numeric features and categorical columns that drifted, in test order."""
        tests: list[tuple[str, FeatureDrift | CategoryShift]] = [*self.features.items(),
                                                                 *self.categories.items()]
        return [name for name, test in tests if test.drifted]

    @property
    def missing_changed(self) -> list[str]:
        """Columns whose share of missing values moved."""
        return [name for name, test in self.missing.items() if test.drifted]

    @property
    def drift_score(self) -> float:
        """The largest PSI of any feature or of the scores: the app publishes it as a gauge."""
        return max([f.psi for f in self.features.values()]
                   + [self.score.psi if self.score else 0.0])

    @property
    def summary(self) -> str:
        """One line naming what drifted, for the verdict."""
        if self.verdict != DRIFT:
            return self.verdict
        parts = []
        if self.drifted_features:
            parts.append("features drifted: " + ", ".join(self._shift_of(name)
                                                          for name in self.drifted_features))
        if self.missing_changed:
            parts.append("missing values changed: " + ", ".join(
                f"{n} {self.missing[n].reference_rate:.2f} -> {self.missing[n].current_rate:.2f}"
                for n in self.missing_changed))
        if self.skew and self.skew.drifted:
            parts.append(f"predicted classes skewed (chi2 p={self.skew.pvalue:.1e}, TV distance "
                         f"{self.skew.total_variation:.2f})")
        if self.confidence and self.confidence.drifted:
            parts.append(f"confidence fell {self.confidence.reference_mean:.3f} -> "
                         f"{self.confidence.current_mean:.3f}")
        if self.score and self.score.drifted:
            parts.append(f"model scores shifted {self.score.reference_mean:.3f} -> "
                         f"{self.score.current_mean:.3f} (PSI {self.score.psi:.2f})")
        return "drift: " + "; ".join(parts)

    def _shift_of(self, name: str) -> str:
        if name in self.features:
            return f"{name} (PSI {self.features[name].psi:.2f})"
        return f"{name} (chi2 p={self.categories[name].pvalue:.1e})"

    def to_dict(self) -> dict:
        """The report.json form: the tests that ran, plus the derived lists and the score."""
        plain = {key: value for key, value in asdict(self).items()
                 if value is not None and value != {} or key == "features"}
        return {**plain, "drifted_features": self.drifted_features,
                "missing_changed": self.missing_changed, "drift_score": self.drift_score,
                "summary": self.summary}


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


def feature_drift(reference: np.ndarray, current: np.ndarray,
                  cfg: MonitorConfig) -> FeatureDrift:
    """PSI and KS of one feature, and whether it drifted."""
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    test = stats.ks_2samp(reference, current)
    value = psi(reference, current, cfg.bins)
    return FeatureDrift(psi=round(value, 4), ks_statistic=round(float(test.statistic), 4),
                        ks_pvalue=float(test.pvalue),
                        reference_mean=round(float(reference.mean()), 4),
                        current_mean=round(float(current.mean()), 4),
                        drifted=bool(value >= cfg.psi_threshold and test.pvalue < cfg.ks_alpha))


def class_skew(predicted: pd.Series, label_counts: dict[str, int],
               cfg: MonitorConfig) -> ClassSkew:
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
    return ClassSkew(
        chi2=round(float(test.statistic), 3), pvalue=float(test.pvalue),
        total_variation=round(distance, 4),
        predicted_share={n: round(float(s), 4) for n, s in zip(names, share)},
        training_share={n: round(float(s), 4) for n, s in zip(names, expected_share)},
        drifted=bool(test.pvalue < cfg.chi2_alpha and distance >= cfg.min_class_shift))


def category_shift(values: pd.Series, counts: dict[str, int],
                   cfg: MonitorConfig) -> CategoryShift:
    """Chi-squared test of a categorical column's values against its training counts; values
    never seen in training are one more category, "(unseen)", expected almost never."""
    names = list(counts)
    observed = values.astype(str).value_counts()
    unseen = int(observed.drop(labels=names, errors="ignore").sum())
    observed = np.append(observed.reindex(names, fill_value=0).to_numpy(), unseen)
    # Half a count for every category keeps expected counts positive (a chi-squared test needs
    # them) while a category missing from training still weighs almost nothing.
    expected_share = np.append(np.array([counts[n] for n in names], float), 0.0) + 0.5
    expected_share /= expected_share.sum()
    test = stats.chisquare(observed, expected_share * observed.sum())
    share = observed / max(observed.sum(), 1)
    distance = 0.5 * float(np.abs(share - expected_share).sum())
    shares = dict(zip([*names, "(unseen)"], share))
    return CategoryShift(
        chi2=round(float(test.statistic), 3), pvalue=float(test.pvalue),
        total_variation=round(distance, 4),
        current_share={n: round(float(s), 4) for n, s in shares.items() if s > 0},
        drifted=bool(test.pvalue < cfg.chi2_alpha and distance >= cfg.min_class_shift))


def missing_shift(reference_rate: float, missing: pd.Series,
                  cfg: MonitorConfig) -> MissingShift:
    """Has the share of missing values of a column moved from its training rate?"""
    count, total = int(missing.sum()), len(missing)
    rate = count / max(total, 1)
    # A rate of exactly 0 or 1 makes every other count impossible: keep the test defined.
    expected = min(max(reference_rate, 1e-4), 1 - 1e-4)
    pvalue = float(stats.binomtest(count, total, expected).pvalue) if total else 1.0
    return MissingShift(reference_rate=round(reference_rate, 4), current_rate=round(rate, 4),
                        pvalue=pvalue,
                        drifted=bool(abs(rate - reference_rate) >= cfg.missing_shift
                                     and pvalue < cfg.ks_alpha))


def confidence_shift(reference: list[float], current: np.ndarray,
                     cfg: MonitorConfig) -> ConfidenceShift:
    """Has mean confidence dropped against the reference's?"""
    ref, current = np.asarray(reference, float), np.asarray(current, float)
    test = stats.ks_2samp(ref, current)
    drop = float(ref.mean() - current.mean())
    return ConfidenceShift(reference_mean=round(float(ref.mean()), 4),
                           current_mean=round(float(current.mean()), 4), drop=round(drop, 4),
                           ks_pvalue=float(test.pvalue),
                           drifted=bool(drop >= cfg.confidence_drop and test.pvalue < cfg.ks_alpha))


def check_model(rows: pd.DataFrame, reference: dict, cfg: MonitorConfig) -> ModelDrift:
    """All tests for the rows one model version served, against that version's reference."""
    result = ModelDrift(rows=len(rows))
    if len(rows) < cfg.min_samples:
        result.verdict = TOO_FEW
        result.note = (f"{len(rows)} predictions; at least {cfg.min_samples} "
                       "(monitor.min_samples) are needed for a test")
        return result
    if not reference.get("features") and not reference.get("categories"):
        result.note = ("this model's checkpoint has no reference features (it was trained "
                       "before they were recorded): only skew is tested")
    _test_columns(rows, reference, cfg, result)
    if reference.get("label_counts"):
        result.skew = class_skew(rows["predicted_class"], reference["label_counts"], cfg)
    if reference.get("confidence"):
        result.confidence = confidence_shift(reference["confidence"],
                                             rows["confidence"].to_numpy(), cfg)
    if reference.get("scores") and "score" in rows:
        result.score = feature_drift(reference["scores"], rows["score"].to_numpy(), cfg)
    flags = [bool(result.drifted_features), bool(result.missing_changed),
             *(test.drifted for test in (result.skew, result.confidence, result.score) if test)]
    result.verdict = DRIFT if any(flags) else NO_DRIFT
    return result


def _test_columns(rows: pd.DataFrame, reference: dict, cfg: MonitorConfig,
                  result: ModelDrift) -> None:
    """Numeric features, categorical columns and missing rates, each where the log has it."""
    prefix = reference.get("log_prefix", "")
    for name, values in (reference.get("features") or {}).items():
        if prefix + name in rows:
            current = pd.to_numeric(rows[prefix + name], errors="coerce").dropna()
            if len(current):
                result.features[name] = feature_drift(values, current.to_numpy(), cfg)
    for name, counts in (reference.get("categories") or {}).items():
        if prefix + name in rows and rows[prefix + name].notna().any():
            result.categories[name] = category_shift(rows[prefix + name].dropna(), counts, cfg)
    for name, rate in (reference.get("missing_rate") or {}).items():
        if prefix + name in rows:
            result.missing[name] = missing_shift(rate, rows[prefix + name].isna(), cfg)
