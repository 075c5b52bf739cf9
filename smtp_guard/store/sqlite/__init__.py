"""SQLite implementation of the store interfaces (the only package with SQL in it)."""
