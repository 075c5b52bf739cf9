"""Verifiable erasure: keyed tombstones, receipts and their store interface, the key ring, the
in-memory tombstone index, file scans."""
