"""PostgreSQL implementation of the store interfaces, for several guard instances on one store
(docs/design.md, "Scale"); the same protocols as ``store/sqlite``."""
