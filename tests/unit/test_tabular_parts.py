"""The tabular example's pure parts: the generated table, column plans, thresholds, metrics,
the rules engine and the served-record checks (no Ray here)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from mlsd_ray.core.errors import InputError
from mlsd_ray.serve.schemas import ClientError
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.tabular import metrics as tm
from mlsd_ray.tasks.tabular.config import TabularConfig, ThresholdConfig
from mlsd_ray.tasks.tabular.preprocess import coerce, plan_columns, unused_rules
from mlsd_ray.tasks.tabular.records import check_record, records_from_json
from mlsd_ray.tasks.tabular.rules import RulesError, decide, parse_rules
from mlsd_ray.tasks.tabular.serve import DEFAULT_RULES
from mlsd_ray.tasks.tabular.sources import fraud_synth, load_table

POLICY = {"on_missing_column": "impute", "on_extra_column": "ignore",
          "on_unseen_category": "ignore", "on_nan": "impute"}
COLUMNS = [{"name": "amount", "kind": "numeric", "impute": "median"},
           {"name": "country", "kind": "categorical", "impute": "constant",
            "categories": ["US", "GB"]},
           {"name": "age", "kind": "numeric", "impute": "none"}]


def test_fraud_synth_is_rare_incomplete_and_seeded():
    frame = fraud_synth(20_000, seed=0)
    features = frame.drop(columns=["transaction_id", "is_fraud"])
    assert 0.01 <= frame["is_fraud"].mean() <= 0.02
    assert 0.03 <= features.isna().to_numpy().mean() <= 0.07
    assert (frame["amount"] > 20 * frame["amount"].median() * 10).sum() > 0  # 40× outliers
    assert frame.equals(fraud_synth(20_000, seed=0))
    # learnable: fraud is far likelier among the riskiest categories
    risky = frame["merchant_category"].isin(["crypto", "gaming"])
    assert frame.loc[risky, "is_fraud"].mean() > 3 * frame.loc[~risky, "is_fraud"].mean()


def test_sources_name_their_problems(tmp_path):
    with pytest.raises(InputError, match="unknown tabular source"):
        load_table("excel:x.xlsx")
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2], "y": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="--label"):
        load_table(f"csv:{path}")
    with pytest.raises(InputError, match="'target' is not in .*columns are: a, y"):
        load_table(f"csv:{path}", label="target")
    assert load_table("diabetes").label == "progression"
    assert load_table("breast-cancer").frame["malignant"].sum() == 212


def test_example_config_and_unknown_example():
    cfg = load_config(None, ["tabular.source=diabetes"], example="fraud")
    assert cfg.task == "tabular" and cfg.tabular.columns["amount"].scale == "log"
    assert cfg.tabular.source == "diabetes"
    with pytest.raises(InputError, match="unknown example 'fruad'.*digits, fraud"):
        load_config(None, [], example="fruad")
    with pytest.raises(InputError, match="unknown config key 'tabular.columns.amount.scal'"):
        load_config(None, ["tabular.columns.amount.scal=log"], example="fraud")


def test_plan_follows_kinds_defaults_and_rules():
    frame = pd.DataFrame({"amount": [1.0, None], "country": ["US", None], "id": ["a", "b"],
                          "y": [0, 1]})
    cfg = TabularConfig(drop_columns=["id"], columns={"amount": {"impute": "iterative",
                                                                 "scale": "robust"}})
    plan = {e["name"]: e for e in plan_columns(frame, "y", cfg)}
    assert set(plan) == {"amount", "country"}
    assert plan["amount"]["impute"] == "iterative" and plan["amount"]["scale"] == "robust"
    assert plan["country"]["encode"] == "onehot" and plan["country"]["fill_value"] == "missing"
    with pytest.raises(InputError, match="column 'country' is categorical"):
        plan_columns(frame, "y", TabularConfig(columns={"country": {"impute": "mean"}}))
    assert unused_rules(frame, TabularConfig(columns={"nope": {"scale": "log"}})) == ["nope"]


def test_coerce_counts_values_that_are_not_numbers():
    frame = pd.DataFrame({"amount": [1, "abc", None, float("inf")], "country": ["US", 3, None,
                                                                               "GB"]})
    plan = [{"name": "amount", "kind": "numeric"}, {"name": "country", "kind": "categorical"}]
    typed, wrong = coerce(frame, plan)
    assert wrong == {"amount": 2}  # "abc" and inf; None was already missing
    assert typed["amount"].isna().tolist() == [False, True, True, True]
    assert typed["country"].tolist() == ["US", "3", None, "GB"]


def test_thresholds_meet_their_objectives():
    rng = np.random.default_rng(0)
    labels = (rng.random(4000) < 0.05).astype(int)
    scores = np.clip(labels * 0.35 + rng.random(4000) * 0.7, 0, 1)
    chosen = tm.choose_threshold(scores, labels, ThresholdConfig(target=0.8))
    at = tm.binary_metrics(scores, labels, chosen["threshold"])
    assert chosen["met"] and at["precision"] >= 0.8 and at["recall"] > 0
    recall = tm.choose_threshold(scores, labels, ThresholdConfig(objective="target_recall",
                                                                 target=0.9))
    assert tm.binary_metrics(scores, labels, recall["threshold"])["recall"] >= 0.9
    costs = ThresholdConfig(objective="min_cost", cost_false_negative=50, cost_false_positive=1)
    cheapest = tm.choose_threshold(scores, labels, costs)

    def cost(threshold: float) -> float:
        c = tm.binary_metrics(scores, labels, threshold)["confusion"]
        return 50 * c["fn"] + c["fp"]

    assert cost(cheapest["threshold"]) <= min(cost(0.5), cost(chosen["threshold"]))


def test_metrics_against_known_values():
    result = tm.binary_metrics(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]), 0.5)
    assert result["confusion"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    assert result["precision"] == 0.5 and result["roc_auc"] == 0.75
    regression = tm.regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert regression["mse"] == pytest.approx(1 / 3) and regression["mae"] == pytest.approx(1 / 3)
    assert regression["r2"] == pytest.approx(1 - 3 / 14)  # 1 - SS_res 1 / SS_tot 14/3
    assert tm.pr_curve_png({"m": (np.array([0.9, 0.1]), np.array([1, 0]))},
                           None)[:4] == b"\x89PNG"


def test_rules_file_decisions_and_null_fields():
    rules = parse_rules(open(DEFAULT_RULES).read())
    foreign = decide({"amount": 9000.0, "country": "NG"}, 0.1, 0.5, None, rules)
    assert foreign["decision"] == "review" and foreign["model_decision"] == "approve"
    assert [r["name"] for r in foreign["rules_fired"]] == ["large_foreign_amount"]
    burst = decide({"velocity_1h": 15, "amount": None}, 0.6, 0.5, None, rules)
    assert burst["decision"] == "decline"  # the rule's decline beats the model's review
    assert decide({}, 0.99, 0.5, None, rules)["decision"] == "decline"  # halfway to 1: 0.75
    assert decide({}, 0.7, 0.5, None, rules)["decision"] == "review"
    score_rule = parse_rules("rules:\n  - {name: s, when: score > 0.2 and amount % 100 == 0, "
                             "action: review}\n")
    assert decide({"amount": 500.0}, 0.3, 0.9, None, score_rule)["decision"] == "review"


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - name: a\n    when: amount >> \n    action: review\n",
     "line 3: rule 'a': syntax error in `when`"),
    ("rules:\n  - name: a\n    when: __import__('os').system('x')\n    action: review\n",
     "line 3: rule 'a': `Call` is not allowed"),
    ("rules:\n  - name: a\n    when: amount.real > 1\n    action: review\n",
     "`Attribute` is not allowed"),
    ("rules:\n  - name: a\n    when: amount > 1\n    action: block\n",
     "line 4: rule 'a': action 'block'; use review or decline"),
    ("rules:\n  - name: a\n   when: x\n", "line 3: not valid YAML"),
    ("rules:\n  - name: a\n    when: amont > 1\n    action: review\n",
     "line 3: rule 'a': unknown field 'amont'"),
    ("rules:\n  - name: a\n    when: amount > 1\n", "line 2: the rule lacks action"),
    ("rulez: []\n", "line 1: unknown key 'rulez'"),
    ("rules:\n  - name: big\n    when: 1 in [0] * 1000000000\n    action: review\n",
     "line 3: rule 'big': `[0] * 1000000000` makes a sequence of 1000000000 items; at most "
     "10000"),
    ("rules:\n  - name: rep\n    when: country in 'ab' * amount\n    action: review\n",
     "rule 'rep': `'ab' * amount` could make a sequence past 10000 items"),
    ("rules:\n  - name: s\n    when: country == '" + "x" * 1500 + "'\n    action: review\n",
     "rule 's': a constant of 1500 characters; at most 1000"),
    ("rules:\n  - name: long\n    when: amount > " + "1+" * 1000 + "1\n    action: review\n",
     "rule 'long': the condition has 2010 characters; at most 2000"),
    ("rules:\n  - name: deep\n    when: amount > " + "1+" * 60 + "1\n    action: review\n",
     "rule 'deep': the condition nests too deeply"),
])
def test_bad_rules_name_the_line(text, message):
    with pytest.raises(RulesError, match=re.escape(message)):
        parse_rules(text, {"amount", "country"})


def test_a_records_values_cannot_make_a_rule_allocate_past_the_bound():
    """Sizes that depend on the record are checked as the rule runs: past the bound the rule
    does not apply to that record, and nothing large is built; within it, it works."""
    rules = parse_rules("rules:\n"
                        "  - {name: twice, when: country * 2 == 'FRFR', action: review}\n"
                        "  - {name: joined, when: country + country == 'FRFR', action: review}\n"
                        "  - {name: times, when: amount * count > 10, action: review}\n"
                        "  - {name: fmt, when: country % 1 == 'x', action: review}\n",
                        {"country", "amount", "count"})
    fired = [r.name for r in rules if r.fires({"country": "FR", "amount": 4, "count": 3})]
    assert fired == ["twice", "joined", "times"]
    hostile = {"country": "x" * 6000, "amount": "y" * 9000, "count": 10**9}
    assert [r.name for r in rules if r.fires(hostile)] == []  # each past 10,000: not applied


def test_records_are_checked_as_configured():
    clean, notes = check_record({"amount": 5, "country": "FR", "age": 30, "x": 1}, 0, COLUMNS,
                                POLICY)
    assert clean == {"amount": 5.0, "country": "FR", "age": 30.0}
    assert notes == ["ignored field(s) ['x']", "country: unseen category 'FR' encoded as none"]
    clean, notes = check_record({"age": 30, "amount": None}, 1, COLUMNS, POLICY)
    assert clean["amount"] is None and clean["country"] is None and "amount imputed" in notes
    strict = {**POLICY, "on_missing_column": "reject", "on_extra_column": "reject",
              "on_unseen_category": "reject", "on_nan": "reject"}
    cases = [({"amount": "12", "country": "US", "age": 1}, POLICY, "records\\[0\\].amount: "
              "expected a number, got '12'"),
             ({"amount": 1, "country": "US"}, POLICY, "records\\[0\\].age is null or missing, "
              "and this model has no imputation"),
             ({"amount": 1, "country": "US", "age": 1, "x": 2}, strict, "unknown field"),
             ({"country": "US", "age": 1}, strict, "missing field 'amount'"),
             ({"amount": 1, "country": "FR", "age": 1}, strict, "unseen category 'FR'"),
             ({"amount": float("nan"), "country": "US", "age": 1}, strict, "reject missing"),
             ({"amount": 1, "country": ["US"], "age": 1}, POLICY, "expected a category")]
    for record, policy, message in cases:
        with pytest.raises(ClientError, match=message) as error:
            check_record(record, 0, COLUMNS, policy)
        assert error.value.status == 422
    for body, status in (([], 422), ({"records": []}, 422), ({"records": [1]}, 422),
                         ({"records": [{}] * 3}, 413)):
        with pytest.raises(ClientError) as error:
            records_from_json(body, max_records=2)
        assert error.value.status == status


def test_the_serve_checks_summary_keeps_its_json_and_says_what_it_found():
    from mlsd_ray.tasks.tabular.smoke import DecisionCheck, RuleExample, TabularServeCheck

    regression = TabularServeCheck(url="http://127.0.0.1:8000/v1/fraud/score",
                                   model_version="3", seconds_to_healthy=4.5, records=64,
                                   max_abs_difference=2e-7)
    assert regression.to_dict() == {
        "url": "http://127.0.0.1:8000/v1/fraud/score", "model_version": "3", "records": 64,
        "seconds_to_healthy": 4.5, "max_abs_difference": 2e-7}
    assert regression.describe().endswith("64 rows, version 3; max |HTTP - offline| 2.00e-07")

    binary = TabularServeCheck(
        url="u", model_version="1", seconds_to_healthy=1.0, records=64,
        max_abs_difference=1e-6,
        decided=DecisionCheck(decisions={"approve": 50, "review": 10, "decline": 4},
                              frauds=16, frauds_flagged=13, threshold=0.42),
        example=RuleExample({"amount": 12000.0}, "review", 0.31, ["large_foreign"]))
    plain = binary.to_dict()
    assert list(plain) == ["url", "model_version", "records", "seconds_to_healthy", "decisions",
                           "frauds", "frauds_flagged", "max_abs_difference", "threshold",
                           "example"]
    assert plain["example"] == {"record": {"amount": 12000.0}, "decision": "review",
                                "score": 0.31, "rules": ["large_foreign"]}
    assert "13/16 positives flagged" in binary.describe()
    assert "a large foreign transaction: review (score 0.3100" in binary.describe()
