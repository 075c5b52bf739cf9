"""Bulk-send protection: the volume breaker, approval gates and the fan-out detector.

Trips and learned baselines with their store interface (``model.py``); the streams' counts and
the claim of a trip, in memory (``tally.py``) or in Redis for several guard instances
(``redis_tally.py``); what one guard knows — trips, shadow trips, baselines, the streams it
counts (``state.py``); the rules that trip a stream (``rules.py``); the message policy that
applies a trip to the mail (``policy.py``); the task that keeps the state, the counts and the
store in step (``sync.py``); the admin operations on tripped streams (``service.py``).
"""
