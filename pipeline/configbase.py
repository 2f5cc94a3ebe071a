"""What every params section shares: the strict, frozen base model and the optional-input path type."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _path_not_switch(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a path, not true/false: the input to read, or paths.no_input (inputs/none)")
    return value


# An input a stage reads only when asked: its path, or paths.no_input (DVC then depends on that instead)
OptionalInput = Annotated[str, BeforeValidator(_path_not_switch)]


Executor = Literal["local", "dask"]


class Distributed(Section):
    """A data stage whose pieces of work can run on a Dask cluster: `local` (this machine's processes
    or threads) or `dask` (the scheduler at `scheduler`, or a local cluster the stage starts). The
    output bytes are the same either way."""

    executor: Executor = "local"
    scheduler: str | None = Field(None, description="a Dask scheduler's address (executor dask)")
