"""``smtp-guard store copy``: move an installation's SQLite store into an empty PostgreSQL one.

Every table is copied row for row (COPY, in one transaction: a failure leaves the target as
empty as it was, and the copy can simply run again), with the same ids, the same change-log
positions and the same change generation, so nothing the guards derive from them changes
meaning. Running guards register themselves again (``guard_instances`` is not copied).

A target that already holds data is refused rather than merged: merging two stores' change
logs and ids would silently lose changes, and a second copy over a first is a mistake worth
stopping. The erasure key is a file, not a table: every instance needs the same one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .postgres.db import Connection, PostgresDatabase
from .postgres.schema import TABLES
from .sqlite.db import Database

# Rewritten by the guards themselves; copying them would name processes that never ran here.
_NOT_COPIED = ("guard_instances",)
# SQLite keeps a held recipient's insertion order in its rowid; PostgreSQL in the id column.
_SOURCE_COLUMN = {("held_recipients", "id"): "rowid"}


class TargetNotEmpty(Exception):
    """The PostgreSQL store already holds data; the message says what and how to proceed."""


_CHUNK = 50_000


@dataclass(frozen=True)
class CopiedTable:
    table: str
    rows: int  # copied so far
    finished: bool = True


async def copy_store(source: str | os.PathLike[str], target: PostgresDatabase,
                     progress: Callable[[CopiedTable], None] = lambda copied: None) -> list[CopiedTable]:
    """Copy the SQLite store at ``source`` into ``target`` (migrated first, then checked
    empty). ``progress`` hears of every chunk of rows, and of each table once it is done."""
    async with Database(source) as sqlite:
        await target.open(migrate_schema=True)
        try:
            copied: list[CopiedTable] = []
            async with target.transaction() as conn:
                await _refuse_data(conn, target.location)
                for table in TABLES:
                    if table in _NOT_COPIED:
                        continue
                    done = CopiedTable(table, await _copy_table(sqlite, conn, table, progress))
                    copied.append(done)
                    progress(done)
            return copied
        finally:
            await target.close()


async def _refuse_data(conn: Connection, location: str) -> None:
    counts = []
    for table in TABLES:
        if table in (*_NOT_COPIED, "change_generation"):
            continue
        row = await (await conn.execute(f"SELECT COUNT(*) FROM {table}")).fetchone()
        if row is not None and row[0]:
            counts.append(f"{table} ({row[0]} rows)")
    if counts:
        raise TargetNotEmpty(
            f"the PostgreSQL store at {location} is not empty: {', '.join(counts)}. store copy only fills an "
            "empty store (merging two stores would lose changes); copy into a new database, or drop and "
            "re-create this one if it holds nothing you need")


async def _copy_table(sqlite: Database, conn: Connection, table: str,
                      progress: Callable[[CopiedTable], None]) -> int:
    columns = await (await conn.execute(
        "SELECT column_name, data_type, is_identity = 'YES' FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", (table,))).fetchall()
    names = [name for name, _, _ in columns]
    booleans = [data_type == "boolean" for _, data_type, _ in columns]
    identities = [name for name, _, is_identity in columns if is_identity]
    selected = ", ".join(_SOURCE_COLUMN.get((table, name), name) for name in names)
    if table == "change_generation":
        row = await sqlite.fetchone("SELECT generation FROM change_generation WHERE id = 1")
        await conn.execute("UPDATE change_generation SET generation = %s WHERE id = 1", (row[0] if row else 0,))
        return 1
    copied = 0
    async with conn.cursor() as cursor:
        async with cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
            last = -1 << 63
            # Read in rowid order a chunk at a time: a store of ten million entries must not
            # be held in memory at once.
            while rows := await sqlite.fetchall(
                    f"SELECT {selected}, rowid FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, _CHUNK)):
                for row in rows:
                    await copy.write_row(_converted(row[:-1], booleans))
                last = rows[-1][-1]
                copied += len(rows)
                progress(CopiedTable(table, copied, finished=False))
        for name in identities:
            # New rows continue after the copied ids.
            await cursor.execute(
                f"SELECT setval(pg_get_serial_sequence(%s, %s), GREATEST(MAX({name}), 1), MAX({name}) IS NOT NULL) "
                f"FROM {table}", (table, name))
    return copied


def _converted(row: Sequence[Any], booleans: Sequence[bool]) -> tuple[Any, ...]:
    """SQLite's 0/1 integers where PostgreSQL has booleans."""
    return tuple(bool(value) if is_boolean and value is not None else value
                 for value, is_boolean in zip(row, booleans))
