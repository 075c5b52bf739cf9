"""`smtp-guard serve` runs on uvloop by default where it is installed (``[smtp] event_loop``),
falls back to asyncio's loop under "auto" when it is not, refuses to start under "uvloop"
without it — and the real server on uvloop relays mail, STARTTLS included (aiosmtpd swaps the
protocol under a uvloop transport there)."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_guard.event_loop import loop_factory, run
from smtp_guard.startup import StartupError

from conftest import TLSFiles, free_port, store_toml, wait_until
from sink import Sink


def test_auto_picks_uvloop_when_it_is_installed() -> None:
    import uvloop

    factory, name = loop_factory("auto")
    assert factory is uvloop.new_event_loop
    assert name.startswith("uvloop ")
    assert loop_factory("asyncio") == (None, "asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_refuses_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") == (None, "asyncio (uvloop is not installed)")
    with pytest.raises(StartupError, match=r'\[smtp\] event_loop = "uvloop".*event_loop = "auto"'):
        loop_factory("uvloop")


def test_run_uses_the_chosen_loop() -> None:
    import uvloop

    seen: list[type] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()))

    run(main(), "uvloop")
    run(main(), "asyncio")
    assert seen[0] is uvloop.Loop
    assert not issubclass(seen[1], uvloop.Loop)


async def test_serve_on_uvloop_relays_mail_over_starttls(tmp_path: Path, tls: TLSFiles) -> None:
    port, metrics_port = free_port(), free_port()
    async with Sink() as sink:
        config = tmp_path / "guard.toml"
        config.write_text(
            f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "guard.test"\n'
            f'[smtp.tls]\ncert = "{tls.cert_file}"\nkey = "{tls.key_file}"\nrequire = true\n'
            f'[upstream]\nmode = "smtp"\nhost = "127.0.0.1"\nport = {sink.port}\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
            f'[store]\n{store_toml(tmp_path / "data" / "guard.sqlite3")}')
        log_file = tmp_path / "serve.log"
        with open(log_file, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "smtp_guard", "serve", "--config", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "SMTP_GUARD_CONFIG": ""})
        try:
            await wait_until(lambda: b"smtp-guard listening" in log_file.read_bytes() or process.poll() is not None,
                             timeout=20)
            assert process.poll() is None, log_file.read_text()
            assert "event loop: uvloop" in log_file.read_text()

            def send() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.starttls(context=tls.client_context)
                    return client.sendmail("from@example.test", ["to@example.test"],
                                           b"Subject: over uvloop\r\n\r\nhello\r\n")

            refused = await asyncio.to_thread(send)
            assert refused == {}
            assert [message.rcpt_tos for message in sink.messages] == [["to@example.test"]]
        finally:
            process.terminate()
            assert await asyncio.to_thread(process.wait, 30) == 0
