"""The one keep-or-drop type: what every per-record step of every stage says about a record.

A step returns ``Decision.keep(value)`` (the record goes on, carrying what the step made of it) or
``Decision.drop(reason, message)`` (a stable reason code for the dead-letter table and a one-line message). Code
deep inside a step that can only fail raises :class:`Dropped`, the same decision in exception form, and the step
turns it back into a decision. ``index`` holds index columns the step fills whether it keeps the record or not
(the filter's ``clip_score``); ``detail`` what it had, for the dead-letter row (the score, the raw reply).

Dead-letter rows (:class:`~visinstruct.schemas.Rejection`) and ``dropped_<reason>`` counters are made from
decisions, never rebuilt from stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from visinstruct.schemas.arrow import JsonDict
from visinstruct.schemas.records import Rejection

T = TypeVar("T")
MESSAGE_CHARS = 500  # a message is short, for a terminal and a table cell; detail holds the rest


@dataclass(frozen=True)
class Decision(Generic[T]):
    """Keep (``reason is None``; ``value`` is what the step made of the record) or drop (``reason``, ``message``)."""

    value: T | None = None
    reason: str | None = None
    message: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)
    index: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.reason is None

    @classmethod
    def keep(cls, value: T | None = None, **index: Any) -> Decision[T]:
        return cls(value=value, index=index)

    @classmethod
    def drop(cls, reason: str, message: str, detail: Mapping[str, Any] | None = None, **index: Any) -> Decision[Any]:
        if not reason:
            raise ValueError("a dropped record needs a reason code")
        return cls(reason=reason, message=_one_line(message), detail=dict(detail or {}), index=index)

    def rejection(self, stage: str, key: str = "", url: str | None = None) -> Rejection:
        """The dead-letter row of a dropped record."""
        if self.kept:
            raise ValueError(f"{stage}: a kept record has no dead-letter row (key {key!r})")
        return Rejection(stage, self.reason, self.message, key, url, JsonDict(self.detail))

    @classmethod
    def from_rejection(cls, rejection: Rejection, **index: Any) -> Decision[Any]:
        """A dead-letter row read back as the decision that made it."""
        return cls(reason=rejection.reason, message=rejection.message, detail=dict(rejection.detail), index=index)


class Dropped(Exception):
    """A drop raised from deep inside a step (``raise Dropped("too_small", "32x20 is under 64 pixels")``)."""

    def __init__(self, reason: str, message: str, detail: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.reason, self.message, self.detail = reason, message, dict(detail or {})

    @property
    def decision(self) -> Decision[Any]:
        return Decision.drop(self.reason, self.message, self.detail)


def _one_line(message: str) -> str:
    return str(message)[:MESSAGE_CHARS]
