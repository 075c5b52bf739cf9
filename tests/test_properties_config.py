"""Properties of the config loader over generated documents and environments (hypothesis):
anything gives a Config or a ConfigError that names where (the file and key, or the
environment variable), never another exception; durations read back as written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp_guard.config import (
    _SECTIONS,
    Config,
    ConfigError,
    ListenAddress,
    build_config,
    load_config,
    parse_duration,
    parse_listen,
)

PROPERTIES = settings(max_examples=100, deadline=None, derandomize=bool(os.environ.get("CI")), database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SOURCE = "/etc/smtp-guard/guard.toml"

# Every key of every section, plus the special sections, so that most examples reach a setting.
KEYS: dict[str, list[str]] = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
KEYS["access"] = ["allow_networks"]
KEYS["classify"] = ["default", "rules"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["5m", "90d", "never", "0", "-1s", "1e400", "127.0.0.1:0", "[::1]:2525", "h:" + "1" * 5000,
                     "smtp", "sandbox", "reject", "hold", "a\x00b", "600/m", "0/s", "1e400/s", "10.0.0.0/8",
                     "scrypt$x", "opportunistic", "off"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["class", "header", "pattern", "sender", "subject", "name", "key", "rate", "burst", "action",
                     "match", "shadow", "users", "cert", "x"]), inner, max_size=4), max_leaves=10)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(KEYS) + ["lists", "classes", "rate_limits", "bogus"]),
                                 max_size=3, unique=True)):
        if section in ("lists", "classes"):
            document[section] = draw(st.dictionaries(st.sampled_from(["bounced", "new-list", "Bad Name", "sanction"]),
                                                     st.one_of(values, st.dictionaries(st.sampled_from(
                                                         ["action", "lifetime", "scope", "shadow", "approval_after",
                                                          "fanout_limit", "description"]), values, max_size=3)),
                                                     max_size=2))
        elif section == "rate_limits":
            document[section] = draw(st.one_of(values, st.lists(st.dictionaries(st.sampled_from(
                ["name", "key", "rate", "burst", "action", "match", "shadow"]), values, max_size=6), max_size=2)))
        elif section == "bogus" or draw(st.integers(0, 9)) == 0:
            document[section] = draw(values)
        else:
            keys = KEYS[section] + ["unknown_key"]
            document[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=3))
    return document


def _check(config: Config) -> None:
    assert isinstance(config.smtp.listen, ListenAddress)  # the SMTP listener cannot be turned off
    for section in (config.smtp, config.upstream, config.hold, config.breaker, config.store, config.audit):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float):
                assert math.isfinite(value), (f.name, value)


@PROPERTIES
@given(documents())
@example({"rate_limits": [{"name": "r", "key": "client", "rate": "1/s", "match": {"sender": 5}}]})
@example({"smtp": {"tls": {"cert": "a\x00b", "key": "k"}}})
@example({"breaker": {"factor": math.nan}})
@example({"smtp": {"idle_timeout": math.inf}})
@example({"smtp": {"listen": "h:" + "1" * 5000}})
def test_any_document_is_a_config_or_an_error_naming_the_file(document: dict[str, Any]) -> None:
    try:
        config = build_config(document, SOURCE)
    except ConfigError as error:
        assert str(error).startswith(f"{SOURCE}: "), str(error)
    else:
        _check(config)


env_names = st.one_of(
    st.sampled_from([f"SMTP_GUARD__{section.upper()}__{key.upper()}" for section, keys in KEYS.items()
                     for key in keys]),
    st.sampled_from(["SMTP_GUARD__SMTP", "SMTP_GUARD__X__Y", "SMTP_GUARD__SMTP__TLS__CERT",
                     "SMTP_GUARD__LISTS__BOUNCED__LIFETIME", "SMTP_GUARD__SMTP__LISTEN__PORT",
                     "SMTP_GUARD__RATE_LIMITS__NAME", "SMTP_GUARD____"]),
)
env_values = st.one_of(st.text(max_size=12), scalars.map(str),
                       st.sampled_from(["x", "-1", "1.5", "true", "[1, 2]", '["10.0.0.0/8"]', "{a = 1}", "nan",
                                        "inf", "[" * 2000, "5m", '"5m"', "''", "1e400"]))


@PROPERTIES
@given(st.dictionaries(env_names, env_values, min_size=1, max_size=3))
@example({"SMTP_GUARD__SMTP__MAX_SESSIONS": "x"})
@example({"SMTP_GUARD__SMTP__IDLE_TIMEOUT": "[" * 2000})
def test_any_environment_is_a_config_or_an_error_naming_a_variable(environ: dict[str, str]) -> None:
    try:
        config = load_config(None, environ=environ)
    except ConfigError as error:
        message = str(error)
        # Cross-setting checks name the settings; a value's own error names its variable.
        assert any(f"environment {name}:" in message for name in environ) or message.startswith("<embedded defaults>: ["), message
        if message.startswith("<embedded defaults>: [") and len(environ) == 1:
            ((name, _),) = environ.items()
            section, _, key = name[len("SMTP_GUARD__"):].lower().partition("__")
            assert f"[{section}" in message, message
    else:
        _check(config)


def test_an_environment_error_names_the_variable() -> None:
    """Regression: a bad environment value was reported as ``<embedded defaults>: [smtp].max_sessions``,
    naming a file the operator never wrote instead of the variable to fix."""
    with pytest.raises(ConfigError) as error:
        load_config(None, environ={"SMTP_GUARD__SMTP__MAX_SESSIONS": "x"})
    assert str(error.value) == "environment SMTP_GUARD__SMTP__MAX_SESSIONS: expected an integer, got 'x'"


@pytest.mark.parametrize("document, fragment", [
    ({"rate_limits": [{"name": "r", "key": "client", "rate": "1/s", "match": {"sender": 5}}]},
     "[[rate_limits]][1].match: expected strings"),
    ({"smtp": {"tls": {"cert": "a\x00b", "key": "k"}}}, "[smtp.tls] file 'a\\x00b' does not exist"),
    ({"breaker": {"factor": math.nan}}, "[breaker].factor: expected a number, got nan"),
    ({"smtp": {"idle_timeout": math.inf}}, "[smtp].idle_timeout: inf is not a duration"),
    ({"smtp": {"listen": "h:" + "1" * 5000}}, "[smtp].listen: "),
    ({"smtp": {"listen": "off"}}, "[smtp].listen: "),
])
def test_values_that_used_to_escape_as_other_exceptions_are_config_errors(document: dict[str, Any],
                                                                         fragment: str) -> None:
    """Regression: a non-string match pattern (TypeError), a NUL in a file name (ValueError), a
    5000-digit port (ValueError) escaped; NaN and infinity were accepted as numbers and
    durations; ``[smtp] listen = "off"`` built a guard with no SMTP listener."""
    with pytest.raises(ConfigError) as error:
        build_config(document, SOURCE)
    assert fragment in str(error.value)


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    """Regression: a directory or a file that is not UTF-8 raised IsADirectoryError or
    UnicodeDecodeError out of load_config."""
    with pytest.raises(ConfigError, match=f"^{tmp_path}: "):
        load_config(tmp_path, environ={})
    latin1 = tmp_path / "guard.toml"
    latin1.write_bytes(b'[smtp]\nbanner = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"^{latin1}: not UTF-8 text"):
        load_config(latin1, environ={})


# --- durations and listen addresses --------------------------------------------------------------

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@PROPERTIES
@given(st.integers(1, 10**6), st.sampled_from(sorted(UNITS) + [""]))
@example(5, "m")
@example(90, "d")
def test_durations_read_as_written(amount: int, unit: str) -> None:
    assert parse_duration(f"{amount}{unit}", "here") == amount * UNITS.get(unit, 1)
    assert parse_duration(f" {amount} {unit} ", "here") == amount * UNITS.get(unit, 1)


@PROPERTIES
@given(st.floats(min_value=1e-3, max_value=1e9))
def test_numbers_are_seconds_and_round_trip(seconds: float) -> None:
    assert parse_duration(seconds, "here") == seconds
    assert parse_duration(repr(seconds), "here") == seconds if "e" not in repr(seconds) else True


@PROPERTIES
@given(st.one_of(st.text(max_size=20), st.floats(), st.integers(), st.none(), st.booleans()))
def test_any_duration_or_listen_value_parses_or_names_the_key(value: Any) -> None:
    for parse in (lambda v: parse_duration(v, "[x].key"), lambda v: parse_listen(v, "[x].key")):
        try:
            parse(value)
        except ConfigError as error:
            assert str(error).startswith("[x].key: ")


@PROPERTIES
@given(st.sampled_from(["127.0.0.1", "localhost", "::1", "2001:db8::7"]), st.integers(0, 65535))
def test_listen_addresses_round_trip(host: str, port: int) -> None:
    address = parse_listen(str(ListenAddress(host, port)), "here")
    assert address == ListenAddress(host, port)
