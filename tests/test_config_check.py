"""``smtp-guard config example`` prints the shipped example; ``config check`` validates a
config and names every dangerous setting."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from smtp_guard.cli.main import main
from smtp_guard.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"SMTP_GUARD_CONFIG": None})


def test_example_is_the_shipped_file_and_loads_as_the_defaults(tmp_path: Path) -> None:
    result = invoke("config", "example")
    assert result.exit_code == 0
    assert result.output == (ROOT / "config" / "smtp-guard.toml").read_text()
    written = tmp_path / "guard.toml"
    written.write_text(result.output)
    assert load_config(written, environ={}).smtp == load_config(None, environ={}).smtp


def test_check_of_a_safe_config_has_only_the_expected_notes(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[store]\npath = "data/guard.sqlite3"\n[upstream]\nmode = "smtp"\nhost = "127.0.0.1"\n')
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "guard.sqlite3").touch(mode=0o600)
    result = invoke("config", "check", "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{config_file}: valid. Store: {tmp_path / 'data' / 'guard.sqlite3'}")
    assert "warning" not in result.output
    assert invoke("config", "check", "--config", str(config_file), "--strict").exit_code == 0


def test_check_names_every_dangerous_setting(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text(
        '[smtp]\nlisten = "0.0.0.0:2525"\n'
        '[access]\nallow_networks = ["0.0.0.0/0"]\nallow_open_relay = true\n'
        '[logging]\nplaintext_addresses = true\n'
        '[policy]\nshadow = true\n'
        '[counters]\nurl = "redis://10.0.0.7:6379/0"\non_error = "allow"\n'
        '[upstream]\nmode = "smtp"\nhost = "mx.example.net"\ntls = "none"\n'
        '[store]\npath = "data/guard.sqlite3"\n')
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data").chmod(0o755)
    result = invoke("config", "check", "--config", str(config_file))
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    settings = [line.removeprefix("warning: ").split(":")[0] for line in warnings]
    assert settings == ["[access] allow_open_relay", "[logging] plaintext_addresses", "[policy] shadow",
                        "[counters] on_error", "[upstream] tls", "[smtp] listen", "[store] path", "[store] path"]
    assert "breaks the erasure guarantee" in result.stderr
    assert "chmod 0700" in result.stderr
    assert result.stderr.splitlines()[-1] == "8 warnings."
    assert invoke("config", "check", "--config", str(config_file), "--strict").exit_code == 2


def test_check_of_an_invalid_config_exits_1_naming_file_and_key(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[smtp]\nmax_sesions = 5\n')
    result = invoke("config", "check", "--config", str(config_file))
    assert result.exit_code == 1
    assert f"{config_file}: [smtp]: unknown key(s) max_sesions" in result.output


def test_check_names_readable_files_anywhere_in_the_data_directory(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[store]\npath = "data/guard.sqlite3"\n')
    data = tmp_path / "data"
    (data / "sandbox" / "new").mkdir(parents=True)
    for path in (data, data / "sandbox", data / "sandbox" / "new"):
        path.chmod(0o700)
    (data / "guard.sqlite3").touch(mode=0o600)
    (data / "guard.sqlite3-wal").write_text("")
    (data / "guard.sqlite3-wal").chmod(0o644)
    for number in range(8):
        (data / "sandbox" / "new" / f"{number}.eml").write_text("To: someone@example.com\n")
        (data / "sandbox" / "new" / f"{number}.eml").chmod(0o644)
    result = invoke("config", "check", "--config", str(config_file))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: [store]")]
    assert len(warnings) == 6  # five named one by one, then how many more
    assert any(f"{data / 'guard.sqlite3-wal'} has mode 0644" in line for line in warnings)
    assert warnings[-1] == f"warning: [store] path: 4 more files under {data} can be read by others: chmod -R go-rwx {data}"


def test_check_says_which_settings_the_environment_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "guard.toml"
    config_file.write_text('[smtp]\nlisten = "127.0.0.1:2525"\n')
    result = CliRunner().invoke(main, ["config", "check", "--config", str(config_file)],
                                env={"SMTP_GUARD_CONFIG": None, "SMTP_GUARD__SMTP__LISTEN": "127.0.0.1:2600"})
    assert result.exit_code == 0, result.output
    assert "SMTP on 127.0.0.1:2600" in result.output
    assert "Set by the environment, over the file: SMTP_GUARD__SMTP__LISTEN." in result.output
