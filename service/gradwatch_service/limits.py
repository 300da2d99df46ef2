"""Input limits: every size or count a client controls has a setting (settings.py), and going over one is a 422
whose message names the limit and its setting, checked before anything is stored (the whole request is refused;
what earlier requests stored stays). Both step wires, JSON and binary, are checked by the same functions.

Two limits are answered with a 413, because sending less at a time cures them: the body's size (body.py, on the
wire and after inflating, checked before the body is parsed) and the steps in one batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

__all__ = ["BatchTooLarge", "InputLimits", "LimitExceeded"]


class LimitExceeded(InvalidInput):
    """Invalid input that names the limit it passes and the setting that raises it (`errors` also carry both, for
    programs)."""

    def __init__(self, loc: Sequence[str | int], subject: str, value: int, unit: str, limit: int,
                 setting: str, advice: str = "") -> None:
        super().__init__(loc, f"{subject} {value}{unit}; the limit is {limit}{unit} ({setting})"
                              + (f": {advice}" if advice else ""))
        self.errors[0].update(type="limit_exceeded", limit=limit, setting=setting)


class BatchTooLarge(LimitExceeded):
    """Too many steps or values in one batch: the client answers by sending halves (a 413, not a 422)."""


def _setting(field: str) -> str:
    return f"GRADWATCH_{field.upper()}"


def _json_bytes(doc: Any) -> int:
    return len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode())


@dataclass(frozen=True)
class InputLimits:
    """The limits of settings.py in one place, with a check for each kind of input."""

    max_batch_steps: int
    max_run_layers: int
    max_layer_name_chars: int
    max_run_name_chars: int
    max_config_bytes: int
    max_step_scalars: int
    max_scalar_name_chars: int
    max_webhook_subscriptions: int
    max_webhook_url_chars: int
    max_webhook_name_chars: int
    max_batch_values: int
    max_response_values: int
    max_response_bytes: int

    @classmethod
    def from_settings(cls, settings: Any) -> InputLimits:
        """The settings' values (settings.py documents each; the setting is GRADWATCH_ + the field's name)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    def _over(self, loc: Sequence[str | int], subject: str, value: int, unit: str, field: str,
              error: type[LimitExceeded] = LimitExceeded) -> None:
        limit: int = getattr(self, field)
        if value > limit:
            raise error(loc, subject, value, unit, limit, _setting(field))

    def _chars(self, loc: Sequence[str | int], subject: str, text: str, field: str) -> None:
        self._over(loc, subject, len(text), " characters", field)

    # ------------------------------------------------------------------------------------------------ runs

    def check_run(self, *, name: str | None, config: Any, meta: Any, layers: Sequence[str] | None,
                  stored: bool = False) -> None:
        """PUT /v1/runs/{run_id}'s fields on their own (the merged layer list: `check_run_layers`). `stored`: the
        documents as the database gave them back, which can be larger than what was sent (PostgreSQL's jsonb
        writes 1e308 out as a 309-digit integer), checked again before the PUT commits."""
        if name is not None:
            self._chars(["body", "name"], "name is", name, "max_run_name_chars")
        for key, doc in (("config", config), ("meta", meta)):
            if doc is not None:
                subject = f"{key} as the database stores it is" if stored else f"{key} is"
                self._over(["body", key], subject, _json_bytes(doc), " bytes of JSON", "max_config_bytes")
        if layers is not None:
            self.check_layer_names(["body", "layers"], layers)

    def check_run_layers(self, loc: Sequence[str | int], n_layers: int) -> None:
        """The run's layer list after a PUT or a batch appended to it."""
        self._over(loc, "the run would have", n_layers, " layers", "max_run_layers")

    def check_layer_names(self, loc: Sequence[str | int], layers: Sequence[str]) -> None:
        self._over(loc, "the list has", len(layers), " layers", "max_run_layers")
        for i, layer in enumerate(layers):
            self._chars([*loc, i], "the layer name is", layer, "max_layer_name_chars")

    # ----------------------------------------------------------------------------------------------- steps

    def check_batch(self, n_steps: int, layers: Sequence[str] | None,
                    scalars: Iterable[Mapping[str, Any] | None]) -> None:
        """A step batch, either wire: its step count, its layer list and each step's extra scalars."""
        self._over(["body", "steps"], "the batch has", n_steps, " steps", "max_batch_steps", BatchTooLarge)
        if layers is not None:
            self.check_layer_names(["body", "layers"], layers)
        for i, extra in enumerate(scalars):
            if not extra:
                continue
            loc: list[str | int] = ["body", "steps", i, "scalars"]
            self._over(loc, "the step has", len(extra), " extra scalars", "max_step_scalars")
            for key in extra:
                self._chars([*loc, key], "the scalar name is", key, "max_scalar_name_chars")

    def check_batch_values(self, n_values: int, about: bool = False) -> None:
        """Every number of a batch (a 413: halves pass). `about`: counted on the JSON text before parsing it."""
        subject = "the batch has about" if about else "the batch has"
        self._over(["body", "steps"], subject, n_values, " values", "max_batch_values", BatchTooLarge)

    # ------------------------------------------------------------------------------------------ responses

    def check_response_values(self, loc: Sequence[str | int], n_values: int, advice: str,
                              at_least: bool = False) -> None:
        """What a /steps or /series answer would read or hold; `advice` says how to ask for less."""
        limit = self.max_response_values
        if n_values > limit:
            subject = "the answer would hold at least" if at_least else "the answer would hold"
            raise LimitExceeded(loc, subject, n_values, " values", limit,
                                _setting("max_response_values"), advice=advice)

    def check_response_bytes(self, loc: Sequence[str | int], n_bytes: int, advice: str) -> None:
        """The stored JSON documents a list answer would carry."""
        limit = self.max_response_bytes
        if n_bytes > limit:
            raise LimitExceeded(loc, "the answer would carry", n_bytes, " bytes of stored JSON", limit,
                                _setting("max_response_bytes"), advice=advice)

    def check_query_names(self, loc: Sequence[str | int], names: Sequence[str], kind: str,
                          field: str | None = "max_run_layers") -> None:
        """A comma-separated query list: each name once (a repeat is a mistake, never more data), and no more
        names than a run may have (`field`: the limit, or None when the names come from a fixed set)."""
        if field is not None:
            self._over(loc, "the query names", len(names), f" {kind}", field)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InvalidInput(loc, f"{kind} {name[:64]!r} is named more than once")
            seen.add(name)

    # -------------------------------------------------------------------------------------------- webhooks

    def check_subscription(self, *, url: str | None, name: str | None) -> None:
        if url is not None:
            self._chars(["body", "url"], "the URL is", url, "max_webhook_url_chars")
        if name is not None:
            self._chars(["body", "name"], "name is", name, "max_webhook_name_chars")

    def check_subscription_count(self, existing: int) -> None:
        """Creating one more subscription when `existing` are stored."""
        self._over(["body"], "this would make", existing + 1, " webhook subscriptions", "max_webhook_subscriptions")
