"""SQL both engines share: the WHERE clauses of the listing queries, and the query for the
list names. Each engine passes its own parameter mark ("?" for sqlite3, "%s" for psycopg) and
its substring test, the one place their SQL differs here."""

from __future__ import annotations

from typing import Any

from ..suppression_model import SuppressionFilter


# The distinct list names, one index seek each (both engines index list_name): SELECT DISTINCT
# reads the whole index to find a handful of names, 0.7 s of a start at ten million addresses.
LIST_NAMES = """
    WITH RECURSIVE names(name) AS (
        SELECT MIN(list_name) FROM suppressions
        UNION ALL
        SELECT (SELECT MIN(list_name) FROM suppressions WHERE list_name > name) FROM names WHERE name IS NOT NULL)
    SELECT name FROM names WHERE name IS NOT NULL"""


def live(mark: str) -> str:
    """Entries not expired at the time given as the parameter."""
    return f"(expires_at IS NULL OR expires_at > {mark})"


def suppression_where(filters: SuppressionFilter, now: float, mark: str,
                      contains: str) -> tuple[list[str], list[Any]]:
    """The clauses (joined by AND) and their parameters. ``contains``: the engine's test that
    the lower-cased value holds the parameter, never LIKE (addresses contain "_" and "%")."""
    where: list[str] = []
    parameters: list[Any] = []
    for column, value in (("list_name", filters.list_name), ("kind", filters.kind), ("source", filters.source)):
        if value is not None:
            where.append(f"{column} = {mark}")
            parameters.append(value)
    if filters.contains:
        where.append(contains)
        parameters.append(filters.contains.lower())
    if filters.since is not None:
        where.append(f"created_at >= {mark}")
        parameters.append(filters.since)
    if not filters.include_expired:
        where.append(live(mark))
        parameters.append(now)
    return where, parameters


def attempts_where(since: float | None, reference: str | None, mark: str) -> tuple[str, list[object]]:
    """``WHERE …`` (or nothing) for the erasure attempts of ``erase attempts``, and its parameters."""
    clauses: list[str] = []
    parameters: list[object] = []
    if since is not None:
        clauses.append(f"time >= {mark}")
        parameters.append(since)
    if reference is not None:
        clauses.append(f"reference = {mark}")
        parameters.append(reference)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters
