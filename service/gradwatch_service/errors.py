"""What can go wrong with a request's content, said without HTTP: `api/errors.py` alone gives each its status
code, so storage, parsing and query code never import the web framework nor name a status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

__all__ = ["InvalidInput", "RunNotFound", "RunOfAnotherProject", "StepConflict"]


class InvalidInput(ValueError):
    """Input that parsed but cannot be taken (a per-layer array of the wrong length, a binary body's framing, a
    layer list that reorders the run's, an unknown field or layer of a query): `errors` name where, in FastAPI's
    own shape."""

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.errors: list[dict[str, Any]] = [{"loc": list(loc), "msg": message, "type": "value_error"}]

    @classmethod
    def from_pydantic(cls, exc: ValidationError, loc: Sequence[str | int]) -> InvalidInput:
        """pydantic's errors, each located under `loc` (e.g. ["body", "header"])."""
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        out = cls([*loc, *first["loc"]], first["msg"])
        out.errors = [{"loc": [*loc, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
        return out


class RunNotFound(LookupError):
    """A run nobody created, or one of a project the caller does not see (to whoever asks, another project's run
    is as absent as a missing one). `to_write`: the caller meant to write to it, and is told to PUT it first."""

    def __init__(self, run_id: str, *, to_write: bool = True) -> None:
        hint = f": create it with PUT /v1/runs/{run_id} first" if to_write else ""
        super().__init__(f"run {run_id!r} does not exist{hint}")
        self.run_id = run_id


class RunOfAnotherProject(PermissionError):
    """A PUT, with a token bound to one project, of a run id another project holds. (Run ids are global, so
    that the id is taken cannot be hidden from someone allowed to create runs; nothing of the run is shown.)"""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run id {run_id!r} is taken by a project this token is not bound to: choose another id")
        self.run_id = run_id


class StepConflict(ValueError):
    """Stored steps resent with different values; nothing of the batch was stored."""

    def __init__(self, run_id: str, conflicting: Sequence[int]) -> None:
        shown = ", ".join(map(str, conflicting[:20])) + (" …" if len(conflicting) > 20 else "")
        super().__init__(
            f"{len(conflicting)} step(s) of run {run_id!r} were already stored with different values "
            f"(steps {shown}); nothing of this batch was stored"
        )
        self.steps = list(conflicting)
