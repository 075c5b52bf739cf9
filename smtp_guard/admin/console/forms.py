"""What a console form submitted (or a filter put in the query), with the errors found in it.

A handler reads every field, records an error per field it cannot take, and changes nothing
unless the form is free of errors; the page is then shown again with the operator's input
kept and each error next to its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from aiohttp import web
from multidict import MultiDict, MultiMapping

MAX_TEXT = 1000  # a one-line field
MAX_LINES = 10_000  # addresses in one textarea; more is an import


@dataclass
class Form:
    data: MultiDict[str] = field(default_factory=MultiDict)
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, data: MultiMapping[Any]) -> Form:
        """Text fields only: an uploaded file where text belongs counts as an empty field."""
        return cls(MultiDict((name, value) for name, value in data.items() if isinstance(value, str)))

    def value(self, name: str) -> str:
        """The field as submitted, for showing the form again."""
        return self.data.get(name, "")

    def text(self, name: str, max_length: int = MAX_TEXT) -> str:
        value = self.value(name).strip()
        if len(value) > max_length:
            self.error(name, f"longer than {max_length} characters")
        return value

    def lines(self, name: str, max_items: int = MAX_LINES) -> list[str]:
        """Non-empty lines of a textarea (commas separate too), without duplicates."""
        values = [item.strip() for line in self.value(name).splitlines() for item in line.split(",")]
        found = list(dict.fromkeys(item for item in values if item))
        if len(found) > max_items:
            self.error(name, f"more than {max_items} entries; use an import for more")
        return found

    def checked(self, name: str) -> bool:
        return bool(self.data.get(name))

    def every(self, name: str) -> list[str]:
        """Every value of a repeated field (ticked checkboxes of one group)."""
        return [value for value in self.data.getall(name, []) if value]

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        text = self.text(name)
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            self.error(name, f"{text!r} is not a whole number")
            return default
        if not minimum <= value <= maximum:
            self.error(name, f"must be between {minimum} and {maximum}")
            return default
        return value

    def choice_or_all(self, name: str, choices: Sequence[str], default: str) -> str:
        """One of ``choices`` or "all" (a list page's filter); ``default`` when absent or unknown."""
        text = self.text(name) or default
        if text != "all" and text not in choices:
            self.error(name, f"choose one of {', '.join(choices)} or all")
            return default
        return text

    def error(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)  # the first problem with a field is the one to fix


async def posted(request: web.Request) -> Form:
    """The submitted urlencoded form (the session check already read it for its CSRF token)."""
    return Form.of(await request.post())


def query(request: web.Request) -> Form:
    return Form.of(request.query)
