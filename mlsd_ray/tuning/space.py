"""The search space: `--param` and `tune.space` read and checked against the config, as Ray
Tune's space, and one trial's configuration from its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlsd_ray.core.config import Config, apply_override, describe_errors, parse_override
from mlsd_ray.core.errors import InputError

__all__ = ["DISTRIBUTIONS", "describe", "parse_param", "ray_space", "SearchPlan",
           "trial_config", "validate_space"]

DISTRIBUTIONS = ("loguniform", "uniform", "randint")


def parse_param(text: str) -> tuple[str, Any]:
    """`--param KEY=V1,V2,...` (values) or `--param KEY=loguniform:LOW:HIGH` (a distribution)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise InputError(f"--param expects KEY=V1,V2 or KEY=loguniform:LOW:HIGH, got {text!r}")
    kind, _, bounds = raw.partition(":")
    if kind in DISTRIBUTIONS:
        parts = bounds.split(":")
        if len(parts) != 2:
            raise InputError(f"--param {text!r}: {kind} needs LOW:HIGH")
        return key.strip(), {kind: [_scalar(p) for p in parts]}
    return key.strip(), [_scalar(v) for v in raw.split(",")]


def _scalar(text: Any) -> Any:
    """A number when it reads as one (YAML takes `1e-3` for a string), else YAML's value."""
    if not isinstance(text, str):
        return text
    for number in (int, float):
        try:
            return number(text.strip())
        except ValueError:
            pass
    return parse_override(f"x={text.strip()}")[1]


def _with_value(base: dict, key: str, value: Any) -> dict:
    tree = _copy_tree(base)
    apply_override(tree, key.split("."), value)
    return tree


def _copy_tree(tree: dict) -> dict:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _check_value(base: dict, key: str, value: Any, config_class: type[Config]) -> None:
    from pydantic import ValidationError

    try:
        config_class.model_validate(_with_value(base, key, value))
    except ValidationError as exc:
        raise InputError(f"search space: {key}={value!r}: {describe_errors(exc)}") from None


def validate_space(space: dict[str, Any], search: str, base: Config,
                   searchable: tuple[str, ...] = ()) -> dict[str, Any]:
    """The space with numbers read as numbers; InputError naming the first bad entry
    (a key that cannot be searched, an empty list, a bad bound or value). `train.*` can be
    searched, and the task's own keys that start with one of `searchable`
    (`Task.searchable`); the rest would change the prepared data or the served app."""
    if not space:
        raise InputError("the search space is empty: give --param KEY=V1,V2 or tune.space")
    tree, clean, config_class = base.to_dict(), {}, type(base)
    prefixes = ("train.", *searchable)
    for key, spec in space.items():
        if not key.startswith(prefixes):
            raise InputError(f"search space: {key!r} cannot be searched (only "
                             f"{', '.join(p + '*' for p in prefixes)}; other keys change the "
                             "prepared data or the served app)")
        if isinstance(spec, list):
            if not spec:
                raise InputError(f"search space: {key} has an empty list of values")
            spec = [_scalar(v) for v in spec]
            for value in spec:
                _check_value(tree, key, value, config_class)
        elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
            kind, bounds = next(iter(spec.items()))
            spec = {kind: [_scalar(b) for b in bounds] if isinstance(bounds, list) else bounds}
            _check_distribution(tree, key, spec, search, config_class)
        else:
            raise InputError(f"search space: {key} must be a list of values or one of "
                             f"{{{'|'.join(DISTRIBUTIONS)}: [low, high]}}, got {spec!r}")
        clean[key] = spec
    return clean


def _check_distribution(tree: dict, key: str, spec: dict, search: str,
                        config_class: type[Config]) -> None:
    kind, bounds = next(iter(spec.items()))
    if search == "grid":
        raise InputError(f"search space: {key} is {kind}; grid search needs a list of values")
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, int | float) for b in bounds) and bounds[0] < bounds[1]):
        raise InputError(f"search space: {key}: {kind} needs [low, high] with low < high, "
                         f"got {bounds!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        raise InputError(f"search space: {key}: loguniform needs low > 0, got {bounds[0]}")
    for value in bounds:
        _check_value(tree, key, int(value) if kind == "randint" else value, config_class)


def ray_space(space: dict[str, Any], search: str) -> dict:
    """Our declarative space as Ray Tune's: grid_search, choice, loguniform, uniform, randint."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = tune.grid_search(spec) if search == "grid" else tune.choice(spec)
        else:
            kind, (low, high) = next(iter(spec.items()))
            if kind == "randint":  # inclusive of high, like the values a user lists
                out[key] = tune.randint(int(low), int(high) + 1)
            else:
                out[key] = getattr(tune, kind)(low, high)
    return out


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's dotted overrides applied."""
    tree = base.to_dict()
    for key, value in params.items():
        apply_override(tree, key.split("."), value)
    return type(base).model_validate(tree)


def describe(params: dict, digits: int = 4) -> str:
    """`lr=0.003, batch_size=64`: a trial's parameters by their last key part."""
    return ", ".join(f"{k.split('.')[-1]}={v:.{digits}g}" if isinstance(v, float)
                     else f"{k.split('.')[-1]}={v}" for k, v in params.items())


@dataclass(frozen=True)
class SearchPlan:
    """What a search will run: `search` (grid or random; random over few discrete values
    becomes grid), the `scheduler` that stops trials early (asha, median or none), Tune's
    `num_samples`, the number of `trials`, the `epochs` of each, and the `metric` that ranks
    them (the task's)."""

    search: str
    scheduler: str
    num_samples: int
    trials: int
    epochs: int
    metric: str
