"""The rules engine beside the fraud model: YAML rules, safe expressions, one decision.

    rules:
      - name: large_foreign_amount
        when: amount > 5000 and country not in ["US", "GB"]
        action: review                      # review | decline

A condition is a Python-like expression over the record's fields and `score` (the model's
fraud probability): comparisons, `in` / `not in` a list, `and` / `or` / `not`, + - * / %,
parentheses, numbers, strings, true/false/null. It is parsed once and evaluated by walking its
syntax tree (never `eval`); anything else is refused when the file is loaded, with the line.
A comparison with a missing (null) field is false. The decision is the strictest of the model's
(approve below the threshold, review from it, decline from `decline_above`) and the actions of
the rules that fired: decline > review > approve.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, cast

import yaml

from mlsd_ray.core.errors import InputError

ACTIONS = ("approve", "review", "decline")
RULE_KEYS = {"name", "when", "action"}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
            ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.Mod: operator.mod}
_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False,
              "None": None}


class RulesError(InputError):
    """A rules file that cannot be used; the message names the line and the reason."""


@dataclass(frozen=True)
class Rule:
    name: str
    when: str
    action: str
    line: int
    tree: ast.Expression

    def fires(self, record: dict[str, Any]) -> bool:
        try:
            return bool(_evaluate(self.tree.body, record))
        except (TypeError, ZeroDivisionError, ValueError):
            return False  # a value of the wrong type for this rule: it does not apply


def parse_rules(text: str, fields: set[str] | None = None) -> list[Rule]:
    """The rules in `text`; RulesError with the line for bad YAML, keys, actions or
    expressions, and for fields that are not in `fields` (when given)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RulesError(f"{where}not valid YAML: {getattr(exc, 'problem', None) or exc}") \
            from exc
    items = _rule_nodes(root)
    rules, names = [], set()
    for node in items:
        rule = _rule(node, fields)
        if rule.name in names:
            raise RulesError(f"line {rule.line}: a second rule named {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return rules


def _rule_nodes(root) -> list:
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise RulesError(f"line {root.start_mark.line + 1}: expected a mapping with `rules:`")
    for key, value in root.value:
        if key.value != "rules":
            raise RulesError(f"line {key.start_mark.line + 1}: unknown key {key.value!r}; "
                             "the file holds one key, `rules`")
        if isinstance(value, yaml.ScalarNode) and value.value in ("", "null", "~"):
            return []
        if not isinstance(value, yaml.SequenceNode):
            raise RulesError(f"line {value.start_mark.line + 1}: `rules` must be a list")
        return value.value
    return []


def _rule(node, fields: set[str] | None) -> Rule:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise RulesError(f"line {line}: a rule must be a mapping with name, when and action")
    values = {}
    for key, value in node.value:
        if key.value not in RULE_KEYS:
            raise RulesError(f"line {key.start_mark.line + 1}: unknown rule key "
                             f"{key.value!r}; a rule has name, when and action")
        if not isinstance(value, yaml.ScalarNode):
            raise RulesError(f"line {value.start_mark.line + 1}: {key.value} must be text")
        values[key.value] = (value.value, value.start_mark.line + 1)
    missing = RULE_KEYS - set(values)
    if missing:
        raise RulesError(f"line {line}: the rule lacks {', '.join(sorted(missing))}")
    name, action = values["name"][0], values["action"][0]
    if action not in ("review", "decline"):
        raise RulesError(f"line {values['action'][1]}: rule {name!r}: action {action!r}; "
                         "use review or decline")
    when, when_line = values["when"]
    return Rule(name, when, action, line, compile_condition(when, when_line, name, fields))


def compile_condition(text: str, line: int, name: str = "rule",
                      fields: set[str] | None = None) -> ast.Expression:
    """Parse and check one condition; RulesError naming the line, column and reason."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        column = f" at column {exc.offset}" if exc.offset else ""
        raise RulesError(f"line {line}: rule {name!r}: syntax error in `when`{column}: "
                         f"{exc.msg}") from None
    for node in ast.walk(tree):
        problem = _refused(node, fields)
        if problem:
            raise RulesError(f"line {line}: rule {name!r}: {problem}")
    return tree


def _refused(node: ast.AST, fields: set[str] | None) -> str | None:
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
               ast.Compare, ast.In, ast.NotIn, ast.BinOp, ast.Name, ast.Load, ast.Constant,
               ast.List, ast.Tuple, *_COMPARE, *_ARITHMETIC)
    if not isinstance(node, allowed):
        return f"`{type(node).__name__}` is not allowed in a condition"
    if isinstance(node, ast.Name) and node.id not in _CONSTANTS and fields is not None \
            and node.id not in fields and node.id != "score":
        return f"unknown field {node.id!r}; the fields are: {', '.join(sorted(fields))}, score"
    return None


def _evaluate(node: ast.AST, record: dict[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, record) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, record)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.Compare):
        return _compare(node, record)
    if isinstance(node, ast.BinOp):
        return _ARITHMETIC[type(node.op)](_evaluate(node.left, record),
                                          _evaluate(node.right, record))
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id] if node.id in _CONSTANTS else record.get(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, record) for e in node.elts]
    return cast(ast.Constant, node).value  # the only other node `_refused` lets through


def _compare(node: ast.Compare, record: dict[str, Any]) -> bool:
    left = _evaluate(node.left, record)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
        right = _evaluate(right_node, record)
        if left is None or right is None:
            return False
        if isinstance(op, (ast.In, ast.NotIn)):
            found = left in right
            ok = found if isinstance(op, ast.In) else not found
        else:
            ok = _COMPARE[type(op)](left, right)
        if not ok:
            return False
        left = right
    return True


def model_action(score: float, threshold: float, decline_above: float | None) -> str:
    """decline from `decline_above` (default halfway from the threshold to 1), review from
    the threshold, approve below it."""
    if decline_above is None:
        decline_above = threshold + (1 - threshold) / 2
    if score >= max(decline_above, threshold):
        return "decline"
    return "review" if score >= threshold else "approve"


def decide(record: dict[str, Any], score: float, threshold: float, decline_above: float | None,
           rules: list[Rule]) -> dict:
    """The decision for one record: the model's action, the rules that fired, the result."""
    fired = [r for r in rules if r.fires({**record, "score": score})]
    by_model = model_action(score, threshold, decline_above)
    decision = max([by_model, *(r.action for r in fired)], key=ACTIONS.index)
    return {"decision": decision, "score": round(float(score), 6), "model_decision": by_model,
            "rules_fired": [{"name": r.name, "action": r.action, "when": r.when}
                            for r in fired]}
