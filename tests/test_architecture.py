"""Dependency directions (STYLE.md): data flows SMTP front -> policy -> relay/hold, and only the
composition root picks concrete stores. Imports are read with ``ast``, so nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smtp_guard"


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names a module imports, relative imports resolved (``from .x import y`` gives
    both ``pkg.x`` and ``pkg.x.y``, since y may be a module)."""
    package = module if is_package else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, [base, node.module or ""]))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def imports_of_file(path: Path) -> set[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return imports_of(path.read_text(), module.removesuffix(".__init__"), path.name == "__init__.py")


def files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in paths for name in sorted(imports_of_file(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


ADAPTERS = ("smtp_guard.smtp", "smtp_guard.relay", "smtp_guard.store.sqlite", "smtp_guard.store.postgres",
            "smtp_guard.admin", "smtp_guard.cli")


def test_policy_depends_on_no_adapter() -> None:
    assert violations(files("policy"), ADAPTERS) == []


def test_breaker_depends_on_no_adapter() -> None:
    assert violations(files("breaker"), ADAPTERS) == []


def test_cli_and_admin_do_not_import_each_other() -> None:
    assert violations(files("cli"), ("smtp_guard.admin",)) == []
    assert violations(files("admin"), ("smtp_guard.cli",)) == []


def test_only_the_backends_build_sqlite_stores() -> None:
    allowed = {PACKAGE / "app.py", PACKAGE / "backends.py", *files("store")}
    others = [path for path in PACKAGE.rglob("*.py") if path not in allowed]
    assert violations(others, ("smtp_guard.store.sqlite",)) == []


def test_only_the_backends_build_postgresql_stores() -> None:
    allowed = {PACKAGE / "app.py", PACKAGE / "backends.py", *files("store")}
    others = [path for path in PACKAGE.rglob("*.py") if path not in allowed]
    assert violations(others, ("smtp_guard.store.postgres", "psycopg", "psycopg_pool")) == []


def test_the_engines_do_not_import_each_other() -> None:
    assert violations(files("store/sqlite"), ("smtp_guard.store.postgres",)) == []
    assert violations(files("store/postgres"), ("smtp_guard.store.sqlite",)) == []


def test_imports_are_resolved() -> None:
    source = "from .base import Decision\nfrom ..relay import pool\nfrom . import base\nimport smtp_guard.cli.main as m\n"
    assert imports_of(source, "smtp_guard.policy.x") == {
        "smtp_guard.policy.base", "smtp_guard.policy.base.Decision", "smtp_guard.relay", "smtp_guard.relay.pool",
        "smtp_guard.policy", "smtp_guard.cli.main"}
    assert "smtp_guard.policy.base" in imports_of("from .base import X", "smtp_guard.policy", is_package=True)


def test_optional_engines_are_imported_only_when_configured() -> None:
    """Every guard process imports app.py; PostgreSQL, Redis, DNS, DKIM and the console's
    templates cost each of them memory, so they are imported where a config switches them on."""
    import subprocess
    import sys

    optional = ("psycopg", "psycopg_pool", "redis", "dns", "dkim", "nacl", "cryptography", "jinja2", "aiohttp")
    probe = ("import sys, smtp_guard.app, smtp_guard.roles.front, smtp_guard.smtp.transaction; "
             f"print(' '.join(m for m in {optional!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.split() == []
