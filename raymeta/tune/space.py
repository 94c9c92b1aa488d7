"""A sweep's search space: one distribution per config key (or joint choice over several keys).

    space:
      inner.lr: {loguniform: [1.0e-6, 1.0e-3]}
      inner.steps: {int: [1, 3]}
      outer.optimizer: {choice: [adam, adamw]}
      inner.optimizer+moment_policy: {choice: [[sgd, none], [adamw, shared]]}   # joint choice

Each entry becomes an Optuna distribution; a sampled value decodes back into config keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import optuna

from raymeta.config import TrainConfig, set_key
from raymeta.errors import UserError

__all__ = ["DISTRIBUTIONS", "Param", "encode", "number", "parse_param", "parse_space"]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice")


@dataclass
class Param:
    name: str  # a config key, or several joined by "+" (a joint choice)
    kind: str
    args: list[Any]

    @property
    def keys(self) -> list[str]:
        return self.name.split("+")

    def distribution(self) -> Any:
        if self.kind == "loguniform":
            return optuna.distributions.FloatDistribution(float(self.args[0]), float(self.args[1]), log=True)
        if self.kind == "uniform":
            return optuna.distributions.FloatDistribution(float(self.args[0]), float(self.args[1]))
        if self.kind in ("int", "logint"):
            return optuna.distributions.IntDistribution(int(self.args[0]), int(self.args[1]), log=self.kind == "logint")
        return optuna.distributions.CategoricalDistribution([encode(v) for v in self.args])

    def decode(self, value: Any) -> dict[str, Any]:
        """The config keys and values a sampled value stands for."""
        if self.kind == "choice":
            value = next(v for v in self.args if encode(v) == value)
        if len(self.keys) > 1:
            return dict(zip(self.keys, value))
        return {self.name: value}


def encode(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: lists (joint choices) become 'a,b'."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def number(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a number, got {value!r}") from None


def parse_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-6, 1.0e-3]}}, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r} (expected one of {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: choice: expected a non-empty list of values, got {args!r}")
        if "+" in name:
            n = len(name.split("+"))
            for v in args:
                if not isinstance(v, list) or len(v) != n:
                    raise UserError(f"{where}: choice: a joint key of {n} config keys needs lists of {n} values, got {v!r}")
        return Param(name, kind, list(args))
    if "+" in name:
        raise UserError(f"{where}: a joint key (a+b) takes only a choice distribution, got {kind!r}")
    if not isinstance(args, list) or len(args) != 2:
        raise UserError(f"{where}: {kind}: expected [low, high], got {args!r}")
    low, high = (number(a, where) for a in args)
    if not low < high:
        raise UserError(f"{where}: {kind}: empty range [{args[0]}, {args[1]}] (low must be below high)")
    if kind in ("loguniform", "logint") and low <= 0:
        raise UserError(f"{where}: {kind}: the range must be positive, got low = {args[0]}")
    if kind in ("int", "logint") and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: {kind}: expected integer bounds, got {args!r}")
    return Param(name, kind, [args[0], args[1]] if kind not in ("int", "logint") else [int(low), int(high)])


def parse_space(space_raw: Any, cfg: TrainConfig, where: str) -> list[Param]:
    """Every entry of a sweep's `space`, checked against the base config: the keys exist, take values of
    their type, and each joint combination is a valid config."""
    if not isinstance(space_raw, dict) or not space_raw:
        raise UserError(f"{where}: space: expected a mapping of config keys to distributions (at least one)")
    space = []
    for key_name, spec in space_raw.items():
        at = f"{where}: space.{key_name}"
        param = parse_param(str(key_name), spec, at)
        for key in param.keys:  # the key exists and takes values of this type
            probe = copy.deepcopy(cfg)
            if param.kind == "choice":
                for value in param.args:
                    one = dict(zip(param.keys, value)) if len(param.keys) > 1 else {key: value}
                    set_key(probe, key, one[key], at)
            else:
                for value in param.args:
                    set_key(probe, key, value, at)
        if len(param.keys) > 1:  # a joint choice lists whole combinations: each must be a valid config
            for value in param.args:
                probe = copy.deepcopy(cfg)
                for key, v in zip(param.keys, value):
                    set_key(probe, key, v, at)
                try:
                    probe.validate(at)
                except UserError as e:
                    raise UserError(f"{e} (in the combination {value})") from None
        space.append(param)
    return space
