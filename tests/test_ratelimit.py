"""policy/ratelimit.py alone: rule matching, keys, and how several rules combine."""

from __future__ import annotations

from typing import Any

import pytest

from smtp_guard import replies
from smtp_guard.addresses import key_hash, parse_mailbox
from smtp_guard.config import ConfigError, RateLimitRule, build_config
from smtp_guard.counters import InMemoryCounters
from smtp_guard.policy.base import Ask, Decision, MessageContext, MessageVerdict, RecipientContext, Verdict
from smtp_guard.policy.ratelimit import MessageRateLimitPolicy, RateLimitPolicy, format_rate

T0 = 1_700_000_000.0


class Counted:
    """A rate-limit policy with its counters, asked as the pipeline asks it: the policy's
    ``Ask`` settled with ``counters``, its answer returned."""

    def __init__(self, policy: RateLimitPolicy | MessageRateLimitPolicy, counters: InMemoryCounters) -> None:
        self.policy = policy
        self.counters = counters

    async def check(self, recipient: RecipientContext) -> Decision | None:
        assert isinstance(self.policy, RateLimitPolicy)
        return await self._answer(self.policy.check(recipient))

    async def check_message(self, message: MessageContext) -> MessageVerdict | None:
        assert isinstance(self.policy, MessageRateLimitPolicy)
        return await self._answer(self.policy.check_message(message))

    async def _answer(self, ask: Ask[Any] | None) -> Any:
        return None if ask is None else ask.answer(await self.counters.settle(ask.request, ask.now))


def limited(raw: tuple[RateLimitRule, ...], counters: InMemoryCounters | None = None) -> Counted:
    return Counted(RateLimitPolicy(raw, lambda: T0), counters or InMemoryCounters())


def rules(*raw: dict[str, Any]) -> tuple[RateLimitRule, ...]:
    return build_config({"rate_limits": list(raw)}, "test").rate_limits


def rcpt(address: str, sender: str = "news@shop.test", client_ip: str = "192.0.2.1",
         auth_user: str | None = None) -> RecipientContext:
    mailbox = parse_mailbox(address)
    return RecipientContext(mailbox=mailbox, key=address, key_hash=key_hash(address),
                            domain_chain=(mailbox.domain.lower(),), sender=sender, client_ip=client_ip,
                            auth_user=auth_user)


def msg(*addresses: str, message_class: str = "marketing", stream: str = "s1", now: float = T0) -> MessageContext:
    return MessageContext(sender="news@shop.test", client_ip="192.0.2.1", auth_user=None, headers={},
                          subject="", stream=stream, message_class=message_class, body_hash="",
                          recipients=tuple(rcpt(a) for a in addresses), now=now)


def test_rates_read_back_in_their_unit() -> None:
    assert [format_rate(r) for r in (2.0, 0.5, 1 / 3600, 1 / 86400)] == ["2/s", "30/m", "1/h", "1/d"]


async def test_auth_user_rule_ignores_unauthenticated_clients() -> None:
    policy = limited(rules({"name": "u", "key": "auth_user", "rate": "1/h"}))
    assert [await policy.check(rcpt(f"r{i}@example.com")) for i in range(3)] == [None] * 3
    assert await policy.check(rcpt("a@example.com", auth_user="crm")) is None
    decision = await policy.check(rcpt("b@example.com", auth_user="crm"))
    assert decision is not None and decision.verdict is Verdict.DEFER
    assert decision.reply == replies.rate_limited("u")


async def test_null_sender_has_its_own_bucket() -> None:
    policy = limited(rules({"name": "s", "key": "sender_domain", "rate": "1/h"}))
    assert await policy.check(rcpt("a@example.com", sender="<>")) is None
    assert await policy.check(rcpt("a@example.com", sender="a@shop.test")) is None
    assert await policy.check(rcpt("a@example.com", sender="<>")) is not None


async def test_a_recipient_deferred_by_one_rule_is_not_charged_by_another() -> None:
    policy = limited(rules({"name": "client", "key": "client", "rate": "1/h", "burst": 3},
                           {"name": "domain", "key": "recipient_domain", "rate": "1/h"}))
    assert await policy.check(rcpt("a@example.com")) is None
    deferred = await policy.check(rcpt("b@example.com"))
    assert deferred is not None and deferred.rule == "ratelimit.domain"
    # The client rule kept its tokens: two more recipients of other domains pass.
    assert await policy.check(rcpt("c@example.org")) is None
    assert await policy.check(rcpt("d@example.net")) is None
    assert await policy.check(rcpt("e@example.info")) is not None


async def test_hold_rules_reserve_and_the_latest_release_wins() -> None:
    policy = limited(rules({"name": "fast", "key": "client", "rate": "10/s", "action": "hold"},
                           {"name": "slow", "key": "sender", "rate": "1/s", "action": "hold"}))
    assert await policy.check(rcpt("a@example.com")) is None
    held = await policy.check(rcpt("b@example.com"))
    assert held is not None and held.verdict is Verdict.HOLD and held.reply == replies.PACED
    assert (held.rule, held.release_at) == ("ratelimit.slow", pytest.approx(T0 + 1.0))


async def test_message_defer_takes_nothing_when_any_recipient_is_short() -> None:
    counters = InMemoryCounters()
    policy = Counted(MessageRateLimitPolicy(rules({"name": "d", "key": "recipient_domain", "rate": "1/h",
                                                   "match": {"class": "marketing"}})), counters)
    assert await policy.check_message(msg("a@example.com", "b@example.org")) is None
    verdict = await policy.check_message(msg("c@example.com", "d@example.net"))
    assert verdict is not None and verdict.message is not None and verdict.message.verdict is Verdict.DEFER
    assert counters.take("ratelimit.d:example.net", 1 / 3600, 1, T0), "example.net was not charged"
    assert await policy.check_message(msg("e@example.com", message_class="transactional")) is None


def test_rules_needing_the_message_are_left_to_the_message_phase() -> None:
    configured = rules({"name": "stream", "key": "stream", "rate": "1/h"},
                       {"name": "header", "key": "client", "rate": "1/h", "match": {"header": "X-Bulk"}},
                       {"name": "sender", "key": "client", "rate": "1/h", "match": {"sender": "@shop"}})
    assert [r.needs_message for r in configured] == [True, True, False]


def test_unknown_key_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="is not one of client, auth_user"):
        rules({"name": "x", "key": "ip", "rate": "1/s"})
