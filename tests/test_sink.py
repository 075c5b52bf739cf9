"""The test upstreams themselves: if these fail, every relay test's verdict is meaningless."""

from __future__ import annotations

import aiosmtplib
import pytest

from sink import PERMFAIL_RCPT, TEMPFAIL_RCPT, Sink

CONTENT = (b"From: a@shop.test\r\nSubject: t\r\n\r\n.leading dot\r\n..two dots\r\n"
           b"\xe9t\xe9 8bit \t \r\nlast line\r\n")


def client_for(address: tuple[str, int], timeout: float = 5, **options: object) -> aiosmtplib.SMTP:
    host, port = address
    return aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=timeout, **options)  # type: ignore[arg-type]


async def test_delivery_is_recorded_byte_exact(sink: Sink) -> None:
    async with client_for(sink.address) as client:
        errors, reply = await client.sendmail("a@shop.test", ["x@example.com", "y@example.org"], CONTENT)
        await client.rset()
    assert errors == {} and reply.startswith("2.0.0")
    [delivered] = sink.messages
    assert (delivered.mail_from, delivered.rcpt_tos, delivered.content) == (
        "a@shop.test", ["x@example.com", "y@example.org"], CONTENT)
    assert sink.delivered_to() == ["x@example.com", "y@example.org"]
    assert (sink.connections, sink.transactions_started, sink.rsets) == (1, 1, 1)


async def test_rcpt_tempfail_and_permfail_and_data_reply(sink: Sink) -> None:
    sink.tempfail_rcpt.add("later@example.com")
    sink.permfail_rcpt.add("nouser@example.com")
    async with client_for(sink.address) as client:
        await client.mail("a@shop.test")
        for rcpt, expected in [("later@example.com", TEMPFAIL_RCPT), ("nouser@example.com", PERMFAIL_RCPT)]:
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt(rcpt)
            assert f"{refused.value.code} {refused.value.message}" == expected
        await client.rcpt("ok@example.com")
        sink.data_reply = "554 5.7.1 rejected"
        with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
            await client.data(CONTENT)
        assert (rejected.value.code, rejected.value.message) == (554, "5.7.1 rejected")
    assert sink.messages == []


@pytest.mark.parametrize("stage", ["mail", "data"])
async def test_disconnect_without_reply(sink: Sink, stage: str) -> None:
    sink.disconnect_on = stage  # type: ignore[assignment]
    client = client_for(sink.address)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.sendmail("a@shop.test", ["x@example.com"], CONTENT)
    client.close()
    assert sink.messages == []


async def test_hang_until_stop_and_stop_closes_connections(sink: Sink) -> None:
    sink.hang_on = "rcpt"
    client = client_for(sink.address, timeout=0.3)
    await client.connect()
    await client.mail("a@shop.test")
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client.rcpt("x@example.com")
    await sink.stop()  # returns although the session is still hanging
    await sink.stop()  # and is idempotent
    client.close()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await client_for(sink.address).connect()


async def test_starttls_and_auth(tls) -> None:
    async with Sink(tls_context=tls.server_context(), requires_tls=True, auth=("relay", "s3cret")) as sink:
        plain = client_for(sink.address)
        await plain.connect()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await plain.mail("a@shop.test")
        assert refused.value.code == 530
        await plain.quit()

        async with client_for(sink.address, tls_context=tls.client_context) as client:
            await client.starttls()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.login("relay", "wrong")
            await client.login("relay", "s3cret")
            await client.sendmail("a@shop.test", ["x@example.com"], CONTENT)
        assert sink.messages[0].tls and sink.messages[0].login == "relay"
        assert sink.failed_logins > 0


async def test_postfix_smtp_sink_records_the_transaction(postfix_sink, wait_until) -> None:
    async with client_for(postfix_sink.address) as client:
        errors, _ = await client.sendmail("a@shop.test", ["x@example.com", "y@example.org"], CONTENT)
    assert errors == {}
    [message] = await wait_until(postfix_sink.messages, what="smtp-sink dump written")
    assert (message.mail_from, message.rcpt_tos, message.content) == (
        "a@shop.test", ["x@example.com", "y@example.org"], CONTENT)


async def test_implicit_tls(tls) -> None:
    async with Sink(tls_context=tls.server_context(), implicit_tls=True) as sink:
        async with client_for(sink.address, use_tls=True, tls_context=tls.client_context) as client:
            await client.sendmail("a@shop.test", ["x@example.com"], CONTENT)
        assert sink.messages[0].tls and sink.messages[0].content == CONTENT
        # A client that fails the handshake never becomes a session, and stop() does not wait for it.
        with pytest.raises(aiosmtplib.SMTPConnectError):
            await client_for(sink.address, use_tls=True).connect()
