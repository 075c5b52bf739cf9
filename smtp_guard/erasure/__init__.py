"""Verifiable erasure: keyed tombstones, their key ring, the in-memory tombstone index, file scans."""
