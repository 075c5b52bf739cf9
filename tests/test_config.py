"""config.py: safe defaults, strict validation with errors that teach, env overrides, and the
shipped example files."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smtp_guard.config import (
    DEFAULT_CLASSES,
    DEFAULT_LISTS,
    Config,
    ConfigError,
    ListConfig,
    ListenAddress,
    StoreConfig,
    build_config,
    load_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "smtp-guard.toml"
DOCKER_EXAMPLE = ROOT / "config" / "docker.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(text)
    return path


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as error:
        build_config(data, "guard.toml")
    return str(error.value)


# --- defaults -----------------------------------------------------------------------------------

def test_embedded_defaults_are_loopback_and_sandbox() -> None:
    config = load_config(None, environ={"HOME": "/home/ops"})
    assert config == dataclasses.replace(Config(), store=StoreConfig(path="/home/ops/.local/share/smtp-guard/guard.sqlite3"))
    assert config.source == "<embedded defaults>"
    assert config.smtp.listen == ListenAddress("127.0.0.1", 2525)
    assert config.metrics.listen == ListenAddress("127.0.0.1", 9425)
    assert config.admin.listen is None
    assert all(network.is_loopback for network in config.access.allow_networks)
    assert config.upstream.mode == "sandbox"
    assert not config.smtp.tls.enabled and not config.smtp.auth.users
    assert list(config.lists) == ["complained", "unsubscribed", "invalid", "bounced", "manual"]
    assert config.lists["bounced"].lifetime == 90 * 86400 and config.lists["unsubscribed"].lifetime is None


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().smtp.max_recipients = 5  # type: ignore[misc]


# --- errors name the file, the key and the fix ---------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("[smtp]\nlisten_address = \"127.0.0.1:25\"\n", "listen_address"),
    ("[smpt]\nlisten = \"127.0.0.1:25\"\n", "smpt"),
    ("[smtp.tls]\ncertificate = \"x\"\n", "certificate"),
    ("[upstream]\nhostname = \"mx\"\n", "hostname"),
    ("[access]\nallow = []\n", "allow"),
    ("[lists.bounced]\nlifetme = \"1d\"\n", "lifetme"),
])
def test_unknown_key_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    message = str(error.value)
    assert message.startswith(str(path)) and key in message and "known keys" in message


def test_a_near_miss_gets_a_suggestion() -> None:
    assert "unknown key(s) prot (did you mean port?); known keys are" in config_error({"upstream": {"prot": 25}})
    assert "unknown key(s) smpt (did you mean smtp?)" in config_error({"smpt": {}})
    assert ("'startls' is not one of none, opportunistic, starttls, implicit (did you mean 'starttls'?)"
            in config_error({"upstream": {"tls": "startls"}}))
    assert "did you mean" not in config_error({"upstream": {"colour": "blue"}})


def test_missing_file_and_bad_toml_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file; `smtp-guard config example > .*missing.toml` writes"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[smtp]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="guard.toml: not valid TOML"):
        load_config(write(tmp_path, "[smtp\n"), environ={})


@pytest.mark.parametrize("lifetime", ["90 days", "1y", "-3d", True, [1]])
def test_bad_duration(lifetime: Any) -> None:
    message = config_error({"lists": {"bounced": {"lifetime": lifetime}}})
    assert "[lists].bounced.lifetime" in message and "is not a duration" in message and '"90d"' in message


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("30m", 1800), ("12h", 43200), ("2d", 172800),
                                           ("1w", 604800), ("1.5h", 5400), (3600, 3600), ("never", None)])
def test_durations(text: Any, seconds: float | None) -> None:
    assert build_config({"lists": {"bounced": {"lifetime": text}}}, "t").lists["bounced"].lifetime == seconds


@pytest.mark.parametrize("network", ["10.0.0.0/33", "not-a-network", "10.0.0.0/8/8"])
def test_bad_network(network: str) -> None:
    message = config_error({"access": {"allow_networks": [network]}})
    assert "[access].allow_networks" in message and repr(network) in message and "10.0.0.0/8" in message


def test_networks_are_parsed_non_strictly() -> None:
    config = build_config({"access": {"allow_networks": ["192.0.2.7/24", "2001:db8::1/128"]}}, "t")
    assert config.access.allow_networks == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::1/128"))
    assert "expected a list" in config_error({"access": {"allow_networks": "10.0.0.0/8"}})


@pytest.mark.parametrize("listen", ["127.0.0.1", "localhost:", ":2525", "127.0.0.1:70000", "::1:2525", 2525])
def test_bad_listen(listen: Any) -> None:
    message = config_error({"smtp": {"listen": listen}})
    assert "[smtp].listen" in message


@pytest.mark.parametrize("listen, expected", [
    ("0.0.0.0:25", ListenAddress("0.0.0.0", 25)),
    ("[::1]:2525", ListenAddress("::1", 2525)),
    ("localhost:0", ListenAddress("localhost", 0)),
])
def test_listen(listen: str, expected: ListenAddress) -> None:
    assert build_config({"smtp": {"listen": listen}}, "t").smtp.listen == expected


@pytest.mark.parametrize("value", ["", "off"])
def test_metrics_listener_can_be_turned_off(value: str) -> None:
    assert build_config({"metrics": {"listen": value}}, "t").metrics.listen is None


@pytest.mark.parametrize("data, fragment", [
    ({"smtp": {"max_recipients": "10"}}, "[smtp].max_recipients: expected an integer"),
    ({"smtp": {"max_recipients": 0}}, "[smtp].max_recipients: must be at least 1, got 0"),
    ({"smtp": {"bare_line_endings": "ignore"}}, "'ignore' is not one of reject, normalize"),
    ({"upstream": {"tls": "ssl"}}, "is not one of none, opportunistic, starttls, implicit"),
    ({"upstream": {"tls_verify": "yes"}}, "expected true or false"),
    ({"upstream": {"max_connections": 0}}, "max_connections must be at least 1"),
    # A socket would take 99999 modulo 65536: relayed to port 34463, with no error anywhere.
    ({"upstream": {"mode": "smtp", "host": "mx.example.net", "port": 99999}},
     "[upstream] port 99999 is out of range 1-65535"),
    ({"upstream": {"mode": "smtp", "host": "mx.example.net", "port": 0}}, "[upstream] port 0 is out of range"),
    ({"smtp": {"listen": "127.0.0.1:2600"}, "metrics": {"listen": "127.0.0.1:2600"}},
     "[metrics] listen 127.0.0.1:2600 and [smtp] listen 127.0.0.1:2600 are the same port"),
    ({"smtp": {"listen": "0.0.0.0:25"}, "admin": {"listen": "127.0.0.1:25"}}, "[admin] listen 127.0.0.1:25 and [smtp]"),
    ({"upstream": {"username": "relay"}}, "username and password must be set together"),
    ({"lists": {"bounced": {"action": "bounce"}}}, "is not one of reject, drop, hold"),
    ({"lists": {"Bad Name": {}}}, "list names are lower-case"),
    ({"smtp": {"tls": {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"}}}, "does not exist"),
    ({"smtp": {"tls": {"cert": "/nonexistent/cert.pem"}}}, "cert and key must be set together"),
    ({"smtp": {"tls": {"require": True}}}, "require = true needs cert and key"),
    ({"smtp": {"auth": {"users": {"platform": "hunter2"}}}}, "smtp-guard hash-password"),
    ({"addresses": {"dotless_domains": "gmail.com"}}, "expected a list of strings"),
    ({"admin": {"tokens": {"ops": 5}}}, "tokens are stored hashed"),
    ({"admin": {"tokens": {"ops": {"role": "root", "hash": "sha256:" + "0" * 64}}}}, "not one of viewer, admin"),
    ({"admin": {"tokens": {"ops": {"role": "admin", "hash": "secret"}}}}, "64 hex digits"),
    ({"admin": {"tls_cert": "cert.pem"}}, "tls_cert and tls_key go together"),
    ({"smtp": "127.0.0.1:25"}, "expected a table"),
    ({"logging": {"level": "loud"}}, "[logging] level 'loud' is not one of"),
    ({"logging": {"format": "xml"}}, "is not one of text, json"),
])
def test_invalid_values_are_refused_with_the_key(data: dict[str, Any], fragment: str) -> None:
    message = config_error(data)
    assert message.startswith("guard.toml: ") and fragment in message


def test_listeners_on_distinct_ports_or_addresses_or_port_0_are_fine() -> None:
    config = build_config({"smtp": {"listen": "127.0.0.1:2600"}, "metrics": {"listen": "127.0.0.2:2600"},
                           "admin": {"listen": "127.0.0.1:0"}, "unsubscribe": {"listen": "127.0.0.1:0",
                                                                               "base_url": "https://u.example.com/u"}},
                          "t")
    assert config.metrics.listen == ListenAddress("127.0.0.2", 2600)


def test_smtp_mode_without_host_is_refused() -> None:
    message = config_error({"upstream": {"mode": "smtp"}})
    assert '[upstream] mode = "smtp" needs host' in message and 'mode = "sandbox"' in message
    assert build_config({"upstream": {"mode": "smtp", "host": "mx.example.net"}}, "t").upstream.host == "mx.example.net"


def test_lists_merge_with_defaults_and_new_lists_are_added() -> None:
    config = build_config({"lists": {"bounced": {"action": "drop"}, "legal-hold": {"action": "hold"}}}, "t")
    assert config.lists["bounced"] == dataclasses.replace(DEFAULT_LISTS["bounced"], action="drop")
    assert config.lists["legal-hold"] == ListConfig(action="hold")
    assert list(config.lists)[:5] == list(DEFAULT_LISTS)


def test_tls_files_that_exist_are_accepted(tls) -> None:
    config = build_config({"smtp": {"tls": {"cert": str(tls.cert_file), "key": str(tls.key_file), "require": True}}}, "t")
    assert config.smtp.tls.enabled and config.smtp.tls.require


# --- environment overrides ------------------------------------------------------------------------

def test_env_overrides_are_typed_and_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\nmode = "smtp"\nhost = "from-file"\n[smtp]\nmax_recipients = 50\n')
    config = load_config(path, environ={
        "SMTP_GUARD__UPSTREAM__HOST": "mx.internal",
        "SMTP_GUARD__UPSTREAM__PORT": "587",
        "SMTP_GUARD__UPSTREAM__TLS_VERIFY": "false",
        "SMTP_GUARD__SMTP__MAX_RECIPIENTS": "5",
        "SMTP_GUARD__ACCESS__ALLOW_NETWORKS": '["10.0.0.0/8"]',
        "SMTP_GUARD__LISTS__BOUNCED__LIFETIME": "30d",
        "SMTP_GUARD__SMTP__TLS__REQUIRE": "false",
        "OTHER_VARIABLE": "ignored",
    })
    assert (config.upstream.host, config.upstream.port, config.upstream.tls_verify) == ("mx.internal", 587, False)
    assert config.smtp.max_recipients == 5
    assert config.access.allow_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.lists["bounced"].lifetime == 30 * 86400


def test_env_overrides_apply_without_a_file_and_are_validated() -> None:
    config = load_config(None, environ={"SMTP_GUARD__UPSTREAM__MODE": "smtp", "SMTP_GUARD__UPSTREAM__HOST": "10.0.0.5"})
    assert (config.upstream.mode, config.upstream.host) == ("smtp", "10.0.0.5")
    with pytest.raises(ConfigError, match=r"\[upstream\] mode = \"smtp\" needs host"):
        load_config(None, environ={"SMTP_GUARD__UPSTREAM__MODE": "smtp"})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, environ={"SMTP_GUARD__UPSTREAM__HOSTNAME": "mx"})
    with pytest.raises(ConfigError, match="SMTP_GUARD__SECTION__KEY"):
        load_config(None, environ={"SMTP_GUARD__HOST": "mx"})


def test_env_override_of_a_string_setting_keeps_digits_as_a_string() -> None:
    config = load_config(None, environ={"SMTP_GUARD__UPSTREAM__USERNAME": "relay",
                                        "SMTP_GUARD__UPSTREAM__PASSWORD": "123456"})
    assert config.upstream.password == "123456"


# --- validation of values that parse but make no sense ---------------------------------------------

@pytest.mark.parametrize("key", ["retry_initial", "retry_max", "max_age"])
def test_hold_durations_cannot_be_never(key: str) -> None:
    config_error({"hold": {key: "never"}})


@pytest.mark.parametrize("data", [{"lists": {"bounced": {"lifetime": -5}}}, {"smtp": {"idle_timeout": -1}},
                                  {"upstream": {"command_timeout": -1.0}}])
def test_negative_durations_are_refused(data: dict[str, Any]) -> None:
    config_error(data)


@pytest.mark.parametrize("zero", [0, "0s", "0d"])
def test_zero_lifetime_is_refused_in_every_spelling(zero: Any) -> None:
    # "never" is the only way to say "does not expire"; 0 must not silently mean it.
    config_error({"lists": {"bounced": {"lifetime": zero}}})


@pytest.mark.parametrize("data", [{"access": 5}, {"lists": 5}])
def test_non_table_sections_are_config_errors(data: dict[str, Any]) -> None:
    config_error(data)


# --- the shipped example files -------------------------------------------------------------------

def test_example_config_loads_and_equals_the_defaults_it_documents() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.source == str(EXAMPLE)
    assert dataclasses.replace(config, source=Config().source) == load_config(None, environ={})
    assert config.store.path == load_config(None, environ={}).store.path  # "" -> the user's data dir


def test_example_config_shows_every_setting() -> None:
    """Every field of every section appears in the example, so it stays the reference."""
    document = tomllib.loads(EXAMPLE.read_text())

    def missing(section: Any, table: dict[str, Any], where: str) -> list[str]:
        gaps = []
        for field in dataclasses.fields(section):
            if field.name not in table:
                gaps.append(f"{where}.{field.name}")
            elif isinstance(table[field.name], dict) and dataclasses.is_dataclass(value := getattr(section, field.name)):
                gaps += missing(value, table[field.name], f"{where}.{field.name}")
        return gaps

    defaults = Config()
    # Tables of named entries and arrays of rules are checked entry by entry below or shown
    # as commented examples (an empty array of tables cannot be written in TOML).
    by_entry = ("source", "lists", "classes", "rate_limits")
    gaps = [gap for field in dataclasses.fields(Config) if field.name not in by_entry
            for gap in missing(getattr(defaults, field.name), document.get(field.name, {}), field.name)
            if gap != "dkim.keys"]  # [[dkim.keys]]: an array of tables, shown commented
    for name, listing in DEFAULT_LISTS.items():
        gaps += missing(listing, document.get("lists", {}).get(name, {}), f"lists.{name}")
    for name, definition in DEFAULT_CLASSES.items():
        gaps += missing(definition, document.get("classes", {}).get(name, {}), f"classes.{name}")
    assert gaps == []
    assert "[[rate_limits]]" in EXAMPLE.read_text()
    assert "SMTP_GUARD__UPSTREAM__HOST" in EXAMPLE.read_text()


def test_docker_config_listens_on_all_interfaces_and_stores_under_var_lib() -> None:
    config = load_config(DOCKER_EXAMPLE, environ={})
    assert config.smtp.listen == ListenAddress("0.0.0.0", 2525)
    assert config.metrics.listen == ListenAddress("0.0.0.0", 9425)
    assert config.store.path == "/var/lib/smtp-guard/guard.sqlite3"
    assert not any(network.prefixlen == 0 for network in config.access.allow_networks), "never an open relay"


# --- one store, one truth -------------------------------------------------------------------------

def test_relative_paths_are_relative_to_the_config_file_not_the_working_directory(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "smtp-guard"
    etc.mkdir(parents=True)
    (etc / "cert.pem").write_text("x")
    (etc / "key.pem").write_text("x")
    config_file = etc / "guard.toml"
    config_file.write_text('[store]\npath = "data/guard.sqlite3"\n[erasure]\nkey_file = "keys/erasure.key"\n'
                           '[smtp.tls]\ncert = "cert.pem"\nkey = "key.pem"\n[upstream]\nca_file = "/abs/ca.pem"\n')
    monkeypatch.chdir(tmp_path)  # anywhere else: the answer must not change
    config = load_config(config_file, environ={})
    assert config.store.path == str(etc / "data" / "guard.sqlite3")
    assert config.erasure_key_file == etc / "keys" / "erasure.key"
    assert config.smtp.tls.cert == str(etc / "cert.pem") and config.smtp.tls.key == str(etc / "key.pem")
    assert config.upstream.ca_file == "/abs/ca.pem"
    monkeypatch.chdir(etc)
    assert load_config("guard.toml", environ={}).store.path == config.store.path


def test_default_store_is_the_users_data_directory_wherever_the_command_runs(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, environ={"HOME": "/home/ops"}).store.path == "/home/ops/.local/share/smtp-guard/guard.sqlite3"
    assert load_config(None, environ={"XDG_DATA_HOME": "/srv/xdg"}).store.path == "/srv/xdg/smtp-guard/guard.sqlite3"
    assert load_config(None, environ={"HOME": "/h"}).erasure_key_file == Path("/h/.local/share/smtp-guard/erasure.key")


# --- dangerous settings are refused ---------------------------------------------------------------

def test_upstream_host_without_smtp_mode_is_refused() -> None:
    message = config_error({"upstream": {"host": "mx.internal.example"}})
    assert "[upstream] host = 'mx.internal.example' is set but mode is \"sandbox\"" in message
    assert "mode = \"smtp\"" in message
    assert build_config({"upstream": {"host": "mx.internal.example", "mode": "smtp"}}, "t").upstream.mode == "smtp"


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/7"])
def test_an_allow_list_open_to_the_world_is_refused_unless_overridden(network: str) -> None:
    message = config_error({"access": {"allow_networks": [network]}})
    assert "opens the relay to much of the internet" in message and "allow_open_relay = true" in message
    config = build_config({"access": {"allow_networks": [network], "allow_open_relay": True}}, "t")
    assert config.access.allow_open_relay


def test_private_networks_are_fine() -> None:
    config = build_config({"access": {"allow_networks": ["10.0.0.0/8", "192.168.0.0/16", "fd00::/16"]}}, "t")
    assert len(config.access.allow_networks) == 3


def test_every_time_setting_accepts_a_duration() -> None:
    config = build_config({"smtp": {"idle_timeout": "5m", "data_timeout": "90s", "session_timeout": "2h",
                                    "shutdown_grace": "1m"},
                           "upstream": {"connect_timeout": "15s", "command_timeout": "2m", "idle_timeout": "20s"},
                           "store": {"reload_interval": "1s"},
                           "hold": {"poll_interval": "2s"}, "audit": {"flush_interval": "3s"}}, "t")
    assert (config.smtp.idle_timeout, config.smtp.data_timeout, config.smtp.session_timeout) == (300, 90, 7200)
    assert (config.upstream.connect_timeout, config.upstream.command_timeout) == (15, 120)
    assert config.hold.poll_interval == 2 and config.audit.flush_interval == 3 and config.smtp.shutdown_grace == 60


def test_an_error_across_settings_names_the_environment_variables_in_play() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, environ={"SMTP_GUARD__UPSTREAM__HOST": "mx.internal"})
    assert str(error.value).endswith("(settings from the environment: SMTP_GUARD__UPSTREAM__HOST)")
    with pytest.raises(ConfigError, match=r"^environment SMTP_GUARD__ACCESS__ALLOW_NETWORKS: expected a list"):
        load_config(None, environ={"SMTP_GUARD__ACCESS__ALLOW_NETWORKS": "0.0.0.0/0"})
    with pytest.raises(ConfigError, match=r"^environment SMTP_GUARD__SMTP__MAX_SESSIONS: must be at least 1, got 0"):
        load_config(None, environ={"SMTP_GUARD__SMTP__MAX_SESSIONS": "0"})
