"""kill -9 of one of two guard instances on one PostgreSQL store loses no acknowledged mail:
every message it answered 250 to is at the upstream or in the shared hold queue, and the other
instance's release worker delivers the held part (real `smtp-guard serve` processes)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest

from conftest import free_port, wait_until
from erasure_support import cli
from sink import Sink
from smtp_client import message, send
from smtp_guard import replies
from smtp_guard.app import open_admin_context
from smtp_guard.config import load_config
from test_postgres import store_for

SENDER = "news@shop.test"


class Instance:
    def __init__(self, tmp_path: Path, name: str, store: dict[str, str], sink: Sink) -> None:
        self.smtp_port, self.metrics_port = free_port(), free_port()
        self.config_file = tmp_path / f"{name}.toml"
        self.config_file.write_text(
            f'[smtp]\nlisten = "127.0.0.1:{self.smtp_port}"\nhostname = "{name}.test"\n\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n\n'
            f'[store]\nurl = "{store["url"]}"\ndirectory = "{store["directory"]}"\nconfirm_timeout = "1s"\n\n'
            '[hold]\npoll_interval = "0.1s"\n\n[lists.manual]\naction = "hold"\n\n'
            f'[upstream]\nmode = "smtp"\nhost = "127.0.0.1"\nport = {sink.port}\n')
        self.log = (tmp_path / f"{name}.log").open("w+")
        self.process = subprocess.Popen([sys.executable, "-m", "smtp_guard", "serve", "--config",
                                         str(self.config_file)], stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.smtp_port

    async def ready(self) -> bool:
        if self.process.poll() is not None:
            self.log.seek(0)
            raise AssertionError(f"smtp-guard serve exited with {self.process.returncode}:\n{self.log.read()}")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{self.metrics_port}/readyz") as response:
                    return response.status == 200
        except aiohttp.ClientError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def instances(tmp_path: Path, sink: Sink) -> Iterator[list[Instance]]:
    store = store_for(tmp_path)
    started = [Instance(tmp_path, name, store, sink) for name in ("a", "b")]
    yield started
    for instance in started:
        instance.stop()


async def test_killing_one_instance_loses_no_acknowledged_mail(instances: list[Instance], sink: Sink) -> None:
    a, b = instances
    for instance in instances:
        await wait_until(instance.ready, timeout=60, interval=0.1, what="both instances to be ready")
    held = [f"held{i}@example.com" for i in range(3)]
    await cli(a.config_file, "suppress", "add", *held, "--list", "manual")
    # Acknowledged by A: relayed at once, or held durably in the shared store.
    for i in range(5):
        outcome = await send(a.address, SENDER, [f"ok{i}@example.com"], message(subject=f"relayed {i}"))
        assert outcome.data is not None and outcome.data.startswith("250")
    for address in held:
        outcome = await send(a.address, SENDER, [address], message(subject=f"held for {address}"))
        assert outcome.data == str(replies.QUEUED_HELD)

    a.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(a.process.wait, 10)

    async with open_admin_context(load_config(str(b.config_file)), actor="test") as ctx:
        ids = [held_message.id for held_message in await ctx.holds.list()]
    assert len(ids) == len(held)
    for hold_id in ids:  # B confirms; A is dead and its row says so (reported, not waited for long)
        await cli(b.config_file, "hold", "release", hold_id)
    await wait_until(lambda: len(sink.delivered_to()) == 5 + len(held), timeout=30,
                     what="B's release worker to deliver what A held")
    assert sorted(sink.delivered_to()) == sorted([f"ok{i}@example.com" for i in range(5)] + held)
