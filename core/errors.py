"""The one error class darkspec raises for bad input."""

from __future__ import annotations


class DarkspecError(ValueError):
    """A setting or input that darkspec refuses.

    Every instance names the setting, the value it was given and what is allowed, so the message alone tells the
    user what to change. ``code`` is a stable identifier of the rule that refused it (the spec names each code).
    """

    def __init__(self, setting: str, value: object, allowed: str, *, code: str, reason: str = ""):
        self.setting = setting
        self.value = value
        self.allowed = allowed
        self.code = code
        self.reason = reason
        text = f"{setting}={value!r} is not allowed"
        if reason:
            text += f": {reason}"
        text += f"; allowed: {allowed} [{code}]"
        super().__init__(text)
