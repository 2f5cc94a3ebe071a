"""Why a params file is invalid, in one line: the key, the value, and for a typo the closest valid key."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel


def known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the nested model that `loc` points into (for typo suggestions)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None) or (annotation,)
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def describe_error(config: type[BaseModel], error: dict[str, Any], source: str) -> str:
    """One line for the first validation error: the key, the value, and for a typo the closest key."""
    loc = tuple(error["loc"])
    if not loc:  # a check across sections: its message names the keys
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    key = ".".join(str(p) for p in loc) or "<root>"
    if error["type"] == "extra_forbidden":
        known = known_keys(config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
        return f"{source}: unknown key '{key}'{hint}"
    if error["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    value = error.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    return f"{source}: invalid value for '{key}'{shown}: {error['msg']}"
