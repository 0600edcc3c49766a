"""Shared base for every configuration section."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, PlainValidator


class Section(BaseModel):
    """A configuration section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _width(value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError("a number of at least 1, or auto (the CPUs this process may use)")


# A pool's width: a number, or `auto` for the CPUs this process may use (its affinity or its container's CPU quota,
# whichever is smaller: infra.cpus.resolve).
Width = Annotated[int | Literal["auto"], PlainValidator(_width)]
