"""Typed reads of a model's config.json (engine/model_config.py builds the ModelConfig from them)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from engine.errors import ModelLoadError


def read_json_object(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"Could not read {path}: {exc}.") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix config.json "
            "(or download the model again)."
        ) from exc
    except ValueError as exc:  # an integer longer than Python's digit limit (4,300 digits)
        raise ModelLoadError(f"{path} holds a number batchllm cannot read ({exc}); fix config.json "
                             "(or download the model again).") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of model settings; fix config.json "
            "(or download the model again)."
        )
    return raw


class ConfigFields:
    """Typed reads of config.json values: a wrong type or a missing key is a ModelLoadError naming the
    file and the key (transformers would otherwise fail later, blaming something else)."""

    def __init__(self, raw: dict, path: Path) -> None:
        self.raw = raw
        self.path = path

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}; fix config.json (or download the model again).")

    def whole(self, key: str, default: int | None = None, minimum: int = 1, raw: dict | None = None) -> int:
        value = (self.raw if raw is None else raw).get(key)
        if value is None:
            if default is None:
                raise self.error(f"the required key {key!r} is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{key} is {value!r}, not a whole number")
        if value < minimum:
            raise self.error(f"{key} is {value}, it must be at least {minimum}")
        return value

    def number(self, key: str, default: float, raw: dict | None = None, positive: bool = False,
               nonzero: bool = False) -> float:
        """A finite number (NaN and infinities are never settings); `positive`: above 0 (a RoPE base or
        factor, an epsilon, a soft-cap); `nonzero`: not 0 (a multiplier or divisor whose 0 breaks the model)."""
        value = (self.raw if raw is None else raw).get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{key} is {value!r}, not a number")
        return self._checked(key, value, positive, nonzero)

    def numbers(self, key: str, raw: dict, positive: bool = False) -> tuple[float, ...]:
        value = raw.get(key)
        if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise self.error(f"{key} is {value!r}, not a list of numbers")
        return tuple(self._checked(key, v, positive, nonzero=False, within="holds") for v in value)

    def _checked(self, key: str, value: int | float, positive: bool, nonzero: bool, within: str = "is") -> float:
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):
            raise self.error(f"{key} {within} {number!r}, not a finite number")
        if positive and number <= 0:
            raise self.error(f"{key} {within} {value!r}, it must be above 0")
        if nonzero and number == 0:
            raise self.error(f"{key} is 0, it must be a number other than 0")
        return number

    def mapping(self, key: str) -> dict:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"{key} is {value!r}, not an object")
        return value
