"""Bulk-send protection: the volume breaker, approval gates and the fan-out detector.

Trips and learned baselines with their store interface (``model.py``); each stream's tally and
trip, in memory (``state.py``); the rules that trip a stream (``rules.py``); the message policy
that applies a trip to the mail (``policy.py``); the task that keeps the state and the store in
step (``sync.py``); the admin operations on tripped streams (``service.py``).
"""
