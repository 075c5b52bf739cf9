"""SuppressionIndex: snapshot look-ups, the overlay of recent changes, domain rules, priority."""

from __future__ import annotations

from array import array

from smtp_guard.address_table import AddressTable
from smtp_guard.addresses import key_hash
from smtp_guard.index import SuppressionIndex
from smtp_guard.suppression_model import DomainRule, SuppressionDelta, SuppressionSnapshot

LISTS = ("complained", "unsubscribed", "bounced")


def snapshot(addresses: dict[str, str], domains: dict[str, DomainRule] | None = None, seq: int = 1,
             next_expiry: float | None = None) -> SuppressionSnapshot:
    """A snapshot as the store builds it, from sorted unique hashes and parallel list numbers."""
    pairs = sorted((key_hash(key), LISTS.index(list_name)) for key, list_name in addresses.items())
    table = AddressTable.build(array("q", [h for h, _ in pairs]), array("B", [n for _, n in pairs]))
    return SuppressionSnapshot(table, LISTS, dict(domains or {}), seq=seq, next_expiry=next_expiry)


def test_empty_index_finds_nothing() -> None:
    index = SuppressionIndex()
    assert index.lookup_address(key_hash("a@example.com")) is None
    assert index.lookup_domain(["example.com"]) is None
    assert len(index) == 0 and index.seq == 0


def test_snapshot_lookup_returns_the_list_of_each_address() -> None:
    index = SuppressionIndex(snapshot({"a@example.com": "complained", "b@example.com": "bounced",
                                       "c@example.org": "unsubscribed"}))
    assert index.lookup_address(key_hash("a@example.com")) == "complained"
    assert index.lookup_address(key_hash("b@example.com")) == "bounced"
    assert index.lookup_address(key_hash("c@example.org")) == "unsubscribed"
    assert index.lookup_address(key_hash("d@example.org")) is None
    assert len(index) == 3


def test_lookup_at_both_ends_of_the_sorted_array() -> None:
    keys = {f"user{i}@example.com": "bounced" for i in range(200)}
    index = SuppressionIndex(snapshot(keys))
    hashes = sorted(key_hash(k) for k in keys)
    assert index.lookup_address(hashes[0]) == "bounced"
    assert index.lookup_address(hashes[-1]) == "bounced"
    assert index.lookup_address(hashes[-1] + 1) is None
    assert index.lookup_address(hashes[0] - 1) is None


def test_overlay_adds_changes_and_removes_entries() -> None:
    index = SuppressionIndex(snapshot({"a@example.com": "bounced", "b@example.com": "bounced"}, seq=5))
    index.apply(SuppressionDelta(seq=7, addresses={
        key_hash("a@example.com"): "complained",  # moved to a more important list
        key_hash("b@example.com"): None,  # removed
        key_hash("new@example.com"): "unsubscribed",  # added
    }))
    assert index.lookup_address(key_hash("a@example.com")) == "complained"
    assert index.lookup_address(key_hash("b@example.com")) is None
    assert index.lookup_address(key_hash("new@example.com")) == "unsubscribed"
    assert index.seq == 7
    assert index.overlay_size == 3


def test_overlay_can_add_back_what_it_removed() -> None:
    index = SuppressionIndex(snapshot({"a@example.com": "bounced"}))
    index.apply(SuppressionDelta(seq=2, addresses={key_hash("a@example.com"): None}))
    index.apply(SuppressionDelta(seq=3, addresses={key_hash("a@example.com"): "unsubscribed"}))
    assert index.lookup_address(key_hash("a@example.com")) == "unsubscribed"


def test_replace_drops_the_overlay() -> None:
    index = SuppressionIndex(snapshot({}))
    index.apply(SuppressionDelta(seq=2, addresses={key_hash("a@example.com"): "bounced"}))
    index.replace(snapshot({"b@example.com": "complained"}, seq=9))
    assert index.lookup_address(key_hash("a@example.com")) is None
    assert index.lookup_address(key_hash("b@example.com")) == "complained"
    assert index.overlay_size == 0 and index.seq == 9


def test_domain_rule_matches_exactly_unless_it_includes_subdomains() -> None:
    index = SuppressionIndex(snapshot({}, {
        "example.com": DomainRule("unsubscribed", include_subdomains=False),
        "example.org": DomainRule("complained", include_subdomains=True),
    }))
    assert index.lookup_domain(["example.com"]) == "unsubscribed"
    assert index.lookup_domain(["mail.example.com", "example.com"]) is None
    assert index.lookup_domain(["a.b.example.org", "b.example.org", "example.org"]) == "complained"
    assert index.lookup_domain(["example.net"]) is None


def test_most_specific_domain_rule_wins() -> None:
    index = SuppressionIndex(snapshot({}, {
        "example.org": DomainRule("complained", include_subdomains=True),
        "eu.example.org": DomainRule("bounced", include_subdomains=False),
    }))
    assert index.lookup_domain(["eu.example.org", "example.org"]) == "bounced"
    assert index.lookup_domain(["us.example.org", "example.org"]) == "complained"


def test_domain_delta_adds_and_removes_rules() -> None:
    index = SuppressionIndex(snapshot({}, {"example.com": DomainRule("bounced", False)}))
    index.apply(SuppressionDelta(seq=2, domains={"example.com": None,
                                                 "example.net": DomainRule("unsubscribed", True)}))
    assert index.lookup_domain(["example.com"]) is None
    assert index.lookup_domain(["www.example.net", "example.net"]) == "unsubscribed"


def test_list_numbers_index_into_the_priority_ordered_names() -> None:
    """The snapshot stores one list per address: the store puts the winning list's number in
    ``lists``, and the index reports that list's name."""
    pairs = sorted([(key_hash("a@example.com"), 0), (key_hash("b@example.com"), 2)])
    table = AddressTable.build(array("q", [h for h, _ in pairs]), array("B", [n for _, n in pairs]))
    snap = SuppressionSnapshot(table, ("complained", "unsubscribed", "legacy"), {}, seq=1, next_expiry=None)
    index = SuppressionIndex(snap)
    assert index.lookup_address(key_hash("a@example.com")) == "complained"
    assert index.lookup_address(key_hash("b@example.com")) == "legacy"


def test_next_expiry_comes_from_the_snapshot() -> None:
    assert SuppressionIndex(snapshot({}, next_expiry=123.0)).next_expiry == 123.0
