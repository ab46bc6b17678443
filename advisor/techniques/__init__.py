"""The techniques, one module each: a frozen config and its apply function.

Each module also says which of its values this hardware and model can run well
(``options``), and why the others are left out; the knobs table (``advisor/knobs.py``)
names which config field each knob sets, and ``advisor.space`` asks every row.
"""

from __future__ import annotations

from dataclasses import dataclass

ANY = "any"  # an Exclusion's value when every value of its knob but the default is left out


@dataclass(frozen=True)
class Exclusion:
    """A knob value the space does not offer here, with the reason a user reads."""

    knob: str
    value: object
    reason: str

    def to_dict(self) -> dict:
        return {"knob": self.knob, "value": self.value, "reason": self.reason}


def unknown(knob: str, value: object, known: tuple | list) -> ValueError:
    """The error for a value no technique knows, listing the ones it does."""
    listed = ", ".join(repr(k) for k in known)
    return ValueError(f"{knob} must be one of {listed}; got {value!r}")
