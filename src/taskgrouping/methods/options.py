"""Method options: one frozen dataclass per method, defaults written once, values checked on creation.

A method declares ``@register_method("name", NameOptions)``; the config's ``name:`` section becomes
``NameOptions(**section)`` in :func:`taskgrouping.config.validate`, before anything is written or
trained, so a bad value of the third method is reported before the first one trains. Checks that
need the data (task names, task types) live in the method's ``check_data``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence, TypeVar

from taskgrouping.option_values import check_value

if TYPE_CHECKING:
    from taskgrouping.data.base import TaskData

__all__ = ["MethodOptions", "OptionError", "expect", "expect_choice", "expect_int", "expect_number"]

O = TypeVar("O", bound="MethodOptions")


class OptionError(ValueError):
    """A method option is unknown or has a bad value; the message names ``method.key``."""


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options (no options of its own).

    Subclasses are frozen dataclasses whose ``__post_init__`` checks values with :func:`expect` and
    friends, which raise ``ValueError`` starting with the key's name.
    """

    #: whether the method's training step hands the balancer the shared features the heads read
    #: (feature-level balancers and the gradient diagnostics need them)
    gives_features: ClassVar[bool] = True

    def check_data(self, data: TaskData) -> None:
        """Raise ``ValueError`` (naming the option) if these options cannot work on ``data``; called
        for every method of a run once the data is loaded, before anything trains."""
        return None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Key -> default value (``None`` where the default is built by a factory)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_section(cls: type[O], method: str, section: Mapping[str, Any] | None) -> O:
        """The options of ``method`` from its config section; :class:`OptionError` names the bad key."""
        section = dict(section or {})
        keys = cls.keys()
        for k in section:
            if k not in keys:
                expected = sorted(f"{method}.{o}" for o in keys) or "none"
                raise OptionError(f"unknown config key {method}.{k!s}; expected one of {expected}")
        try:
            return cls(**section)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{method}.{exc}") from None


def expect(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ValueError("key must be <expected>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}")


def expect_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, allow_none: bool = False) -> None:
    """``value`` is a finite real number (not a bool) within ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    check_value(key, value, float, low=low, high=high, low_open=low_open, or_null=allow_none)


def expect_int(key: str, value: Any, *, low: int | None = None, allow_none: bool = False) -> None:
    """``value`` is an integer (not a bool), ``>= low`` when given."""
    check_value(key, value, int, low=low, or_null=allow_none)


def expect_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``."""
    check_value(key, value, Any, choices=choices)
