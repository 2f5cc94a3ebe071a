"""What every params section shares: the strict, frozen base model and the optional-input path type."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _path_not_switch(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a path, not true/false: the input to read, or paths.no_input (inputs/none)")
    return value


# An input a stage reads only when asked: its path, or paths.no_input (DVC then depends on that instead)
OptionalInput = Annotated[str, BeforeValidator(_path_not_switch)]
