"""Query parameters of API requests, read once and checked: a wrong value is a 422 naming the
parameter, and a parameter the route does not know is refused, as an unknown JSON member is
(a mistyped filter must not silently widen a listing, an export or an import)."""

from __future__ import annotations

from typing import Collection, TypeVar

from aiohttp import web

from ..services.audit import BadTime, parse_time
from .problems import bad_input

T = TypeVar("T", bound=str)


class Query:
    def __init__(self, request: web.Request, known: Collection[str]) -> None:
        self._params = request.query
        for name in self._params:
            if name not in known:
                hint = f"; known parameters are {', '.join(sorted(known))}" if known else "; this route takes none"
                raise bad_input(name, f"unknown parameter{hint}")
            if len(self._params.getall(name)) > 1:
                raise bad_input(name, "given more than once")

    def text(self, name: str, max_length: int = 1000) -> str | None:
        value = self._params.get(name)
        if value is not None and len(value) > max_length:
            raise bad_input(name, f"longer than {max_length} characters")
        return value

    def required(self, name: str, example: str, max_length: int = 1000) -> str:
        value = self.text(name, max_length)
        if value is None or not value.strip():
            raise bad_input(name, f"required, e.g. ?{name}={example}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        text = self._params.get(name)
        if text is None:
            return default
        # int() alone would also take " 7", "+7", "7_000" and non-ASCII digits.
        if not (text.isascii() and text.isdigit()):
            raise bad_input(name, f"{text[:40]!r} is not a whole number")
        # Twenty digits is past any maximum here; int() of a huge string would cost time.
        if len(text) > 20 or not minimum <= int(text) <= maximum:
            raise bad_input(name, f"must be between {minimum} and {maximum}")
        return int(text)

    def choice(self, name: str, choices: tuple[T, ...], default: T) -> T:
        text = self._params.get(name)
        if text is None:
            return default
        for choice in choices:
            if text == choice:
                return choice
        raise bad_input(name, f"{text[:40]!r} is not one of {', '.join(choices)}")

    def optional_choice(self, name: str, choices: tuple[T, ...]) -> T | None:
        return None if name not in self._params else self.choice(name, choices, choices[0])

    def flag(self, name: str) -> bool:
        text = self._params.get(name, "false")
        if text not in ("true", "false"):
            raise bad_input(name, "must be true or false")
        return text == "true"

    def time(self, name: str, now: float) -> float | None:
        """A relative ("1h": that long ago) or ISO 8601 time, as the CLI's --since takes."""
        text = self.text(name, max_length=64)
        if text is None:
            return None
        try:
            return parse_time(text, now)
        except BadTime as error:
            raise bad_input(name, str(error)) from None
