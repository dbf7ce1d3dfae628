"""Typed errors raised by difforge. Every bad argument becomes one of these, never a bare assert."""

from __future__ import annotations

from collections.abc import Iterable


class DifforgeError(Exception):
    """Base class of every error difforge raises on purpose."""


class InvalidArgumentError(DifforgeError, ValueError):
    """An argument is outside its allowed range or of the wrong kind."""


class UnknownChoiceError(InvalidArgumentError):
    """A value is not one of a fixed set of allowed names; the message lists them."""

    def __init__(self, what: str, value: object, allowed: Iterable[str]):
        self.what = what
        self.value = value
        self.allowed = tuple(allowed)
        super().__init__(
            f"unknown {what} {value!r}; allowed values: {', '.join(map(str, self.allowed))}"
        )


class SamplingCancelled(DifforgeError):
    """Raised from a sampler callback to stop sampling at the next step."""


def check_choice(what: str, value: object, allowed: Iterable[str]) -> None:
    """Raise `UnknownChoiceError` unless `value` is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise UnknownChoiceError(what, value, allowed)
