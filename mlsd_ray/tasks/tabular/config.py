"""The tabular task's own config section, `tabular`: the source, per-column preparation, the
MLP and the decision threshold. `TabularTaskConfig` is the whole config of a tabular run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlsd_ray.core.config import Config, SplitConfig, StrictModel

__all__ = ["ColumnRule", "TabularConfig", "TabularTaskConfig", "ThresholdConfig"]


class ColumnRule(StrictModel):
    """How one table column is prepared; unset keys take the defaults for its kind."""

    kind: Literal["numeric", "categorical"] | None = Field(None, description="Default: by "
                                                           "dtype (numbers are numeric).")
    impute: Literal["mean", "median", "most_frequent", "constant", "iterative", "none"] | None \
        = None
    fill_value: float | str | None = Field(None, description="impute: constant.")
    scale: Literal["standard", "minmax", "robust", "log", "none"] | None = None
    encode: Literal["onehot", "ordinal"] | None = None


class ThresholdConfig(StrictModel):
    """How the decision threshold on a binary model's score is chosen (on the val split)."""

    objective: Literal["target_precision", "target_recall", "min_cost", "fixed"] = Field(
        "target_precision", description="target_precision: the highest recall whose precision "
        "reaches `target`; target_recall: the highest precision whose recall reaches it; "
        "min_cost: the lowest expected cost; fixed: `value`.")
    target: float = Field(0.8, gt=0, le=1, description="The precision or recall to reach.")
    cost_false_negative: float = Field(50.0, ge=0, description="min_cost: a missed fraud.")
    cost_false_positive: float = Field(1.0, ge=0, description="min_cost: a false alarm.")
    value: float = Field(0.5, ge=0, le=1, description="fixed: the threshold itself.")


class TabularConfig(SplitConfig):
    """Tables (the fraud example): source, per-column preparation, the MLP, the decision."""

    source: str = Field("fraud-synth", description="fraud-synth[:N] | breast-cancer | "
                        "diabetes | csv:PATH | parquet:PATH")
    label: str | None = Field(None, description="Label column (default: the source's own; "
                              "required for csv/parquet).")
    task: Literal["auto", "binary", "multiclass", "regression"] = Field(
        "auto", description="auto: regression for a float label with many values, else "
        "binary or multiclass by the number of classes.")
    drop_columns: list[str] = Field(default_factory=list, description="Columns never used "
                                    "as features (ids, timestamps).")
    numeric_impute: Literal["mean", "median", "most_frequent", "constant", "iterative",
                            "none"] = "median"
    numeric_scale: Literal["standard", "minmax", "robust", "log", "none"] = "standard"
    categorical_impute: Literal["most_frequent", "constant", "none"] = "constant"
    categorical_encode: Literal["onehot", "ordinal"] = "onehot"
    columns: dict[str, ColumnRule] = Field(default_factory=dict, description="Per-column "
                                           "rules over the defaults above.")
    hidden: list[int] = Field(default_factory=lambda: [64, 32], description="MLP layer widths.")
    dropout: float = Field(0.1, ge=0, lt=1)
    class_weight: Literal["balanced", "none"] = Field("balanced", description="balanced: "
                                                      "each class weighs n / (k × its count).")
    baseline: bool = Field(True, description="Also fit scikit-learn's HistGradientBoosting on "
                           "the same split, as a reference row.")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    rules: str | None = Field(None, description="Rules YAML for the fraud endpoint (default: "
                              "the example's mlsd_ray/examples/fraud-rules.yaml).")
    on_missing_column: Literal["impute", "reject"] = Field(
        "impute", description="A served record without a feature column.")
    on_extra_column: Literal["ignore", "reject"] = "ignore"
    on_unseen_category: Literal["ignore", "reject"] = Field(
        "ignore", description="ignore: a category never seen in training encodes as none.")
    on_nan: Literal["impute", "reject"] = Field("impute", description="A null or NaN value.")
    decline_above: float | None = Field(None, gt=0, le=1, description="Scores at or above "
                                        "this are declined, from the threshold up to it "
                                        "reviewed (default: halfway from the threshold to 1).")

class TabularTaskConfig(Config):
    """A tabular run's config: the shared sections and `tabular`."""

    task: str = "tabular"
    tabular: TabularConfig = Field(default_factory=TabularConfig)
