"""Composition root: config -> stores -> index -> pipeline -> upstream -> hold worker -> listeners.

The only module that builds concrete stores, pools and servers.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from .addresses import AddressNormalizer
from .config import Config
from .services.context import AdminContext
from .store.sqlite.audit import SQLiteAuditStore
from .store.sqlite.db import Database
from .store.sqlite.holds import SQLiteHoldStore
from .store.sqlite.suppressions import SQLiteSuppressionStore


@asynccontextmanager
async def open_admin_context(config: Config, actor: str) -> AsyncIterator[AdminContext]:
    """Stores for one admin operation (CLI command or API request)."""
    async with Database(config.store.path) as db:
        yield AdminContext(
            config=config,
            suppressions=SQLiteSuppressionStore(db),
            holds=SQLiteHoldStore(db),
            audit=SQLiteAuditStore(db),
            normalizer=AddressNormalizer(config.addresses),
            actor=actor,
        )
