"""The rules engine beside the fraud model: YAML rules, safe expressions, one decision.

    rules:
      - name: large_foreign_amount
        when: amount > 5000 and country not in ["US", "GB"]
        action: review                      # review | decline

A condition is a Python-like expression over the record's fields and `score` (the model's
fraud probability): comparisons, `in` / `not in` a list, `and` / `or` / `not`, + - * / %,
parentheses, numbers, strings, true/false/null. It is parsed once and evaluated by walking its
syntax tree (never `eval`); anything else is refused when the file is loaded, with the line.
A comparison with a missing (null) field is false.

Sizes are bounded, because a rule runs on every scored record: a condition has at most
MAX_CONDITION_CHARS characters and MAX_DEPTH levels; a constant at most MAX_CONSTANT characters
or items; and what `+` and `*` make of strings and lists at most MAX_SEQUENCE. A rule whose
constants alone go past a bound (`[0] * 1000000000`), or that repeats a constant sequence a
record's number of times (`"x" * amount`), is refused when loaded, naming it. With values from a
record, the bound is checked as the rule runs: past it, the rule does not apply to that record,
as with a value of the wrong type. `%` is arithmetic only (no string formatting).

The decision is the strictest of the model's (approve below the threshold, review from it,
decline from `decline_above`) and the actions of the rules that fired: decline > review >
approve.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import yaml

from mlsd_ray.core.errors import InputError

ACTIONS = ("approve", "review", "decline")
RULE_KEYS = {"name", "when", "action"}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
            ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne}
MAX_CONDITION_CHARS = 2_000
MAX_DEPTH = 40
MAX_CONSTANT = 1_000
MAX_SEQUENCE = 10_000


class TooLarge(ValueError):
    """A string or list that a condition would make longer than MAX_SEQUENCE."""


def _sized(value: Any) -> TypeGuard[str | bytes | list | tuple]:
    return isinstance(value, (str, bytes, list, tuple))


def _add(left: Any, right: Any) -> Any:
    if _sized(left) and _sized(right) and len(left) + len(right) > MAX_SEQUENCE:
        raise TooLarge(f"+ would make {len(left) + len(right)} items")
    return left + right


def _multiply(left: Any, right: Any) -> Any:
    sequence, times = (left, right) if _sized(left) else (right, left)
    if _sized(sequence) and isinstance(times, int) and len(sequence) * times > MAX_SEQUENCE:
        raise TooLarge(f"* would make {len(sequence) * times} items")
    return left * right


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, (str, bytes)):  # "%099999999d" % 1 would format a 100 MB string
        raise TypeError("% on text")
    return left % right


_ARITHMETIC = {ast.Add: _add, ast.Sub: operator.sub, ast.Mult: _multiply,
               ast.Div: operator.truediv, ast.Mod: _modulo}
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
        except (TypeError, ZeroDivisionError, ValueError, OverflowError):
            return False  # a value of the wrong type (or size) for this rule: it does not apply


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
    if len(text) > MAX_CONDITION_CHARS:
        raise RulesError(f"line {line}: rule {name!r}: the condition has {len(text)} "
                         f"characters; at most {MAX_CONDITION_CHARS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (RecursionError, MemoryError):  # the parser's own stack, past MAX_DEPTH anyway
        raise RulesError(f"line {line}: rule {name!r}: the condition nests too deeply "
                         f"(at most {MAX_DEPTH} levels)") from None
    except SyntaxError as exc:
        column = f" at column {exc.offset}" if exc.offset else ""
        raise RulesError(f"line {line}: rule {name!r}: syntax error in `when`{column}: "
                         f"{exc.msg}") from None
    for node in ast.walk(tree):
        problem = _refused(node, fields)
        if problem:
            raise RulesError(f"line {line}: rule {name!r}: {problem}")
    problem = _too_deep(tree.body) or _too_large(tree.body)
    if problem:
        raise RulesError(f"line {line}: rule {name!r}: {problem}")
    return tree


def _too_deep(node: ast.AST, depth: int = 0) -> str | None:
    """Evaluation recurses once per level: a chain such as 1+1+...+1 would exhaust the stack."""
    if depth > MAX_DEPTH:
        return f"the condition nests too deeply (at most {MAX_DEPTH} levels)"
    return next(filter(None, (_too_deep(child, depth + 1)
                              for child in ast.iter_child_nodes(node))), None)


def _too_large(node: ast.AST) -> str | None:
    """Refuse a constant past MAX_CONSTANT and a `+` or `*` whose result could pass
    MAX_SEQUENCE whatever the record holds (`_length`)."""
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and _sized(child.value) \
                and len(child.value) > MAX_CONSTANT:
            return f"a constant of {len(child.value)} characters; at most {MAX_CONSTANT}"
        if isinstance(child, (ast.List, ast.Tuple)) and len(child.elts) > MAX_CONSTANT:
            return f"a list of {len(child.elts)} items; at most {MAX_CONSTANT}"
        if isinstance(child, ast.BinOp):
            try:
                length = _length(child)
            except TooLarge as exc:
                return f"`{ast.unparse(child)[:60]}` could make a sequence past " \
                       f"{MAX_SEQUENCE} items ({exc})"
            if length is not None and length > MAX_SEQUENCE:
                return f"`{ast.unparse(child)[:60]}` makes a sequence of {length} items; " \
                       f"at most {MAX_SEQUENCE}"
    return None


def _length(node: ast.AST) -> int | None:
    """The most items `node` can evaluate to as a string or list (0: not a sequence), or None
    when that depends on the record (a field's value; checked as the rule runs)."""
    if isinstance(node, ast.Constant):
        return len(node.value) if _sized(node.value) else 0
    if isinstance(node, (ast.List, ast.Tuple)):
        return len(node.elts)
    if isinstance(node, ast.Name):
        return 0 if node.id in _CONSTANTS else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _length(node.left), _length(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _repeated(node)
    return 0


def _repeated(node: ast.BinOp) -> int | None:
    left, right = _length(node.left), _length(node.right)
    for sequence, times in ((left, node.right), (right, node.left)):
        if sequence:  # a known sequence, repeated `times` times
            if isinstance(times, ast.Constant) and isinstance(times.value, int):
                return sequence * max(times.value, 0)
            if _length(times) is None:
                raise TooLarge("repeated a record's number of times")
            return sequence
    return None if left is None or right is None else 0


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
