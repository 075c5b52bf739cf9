"""What a guard process does, in parts the composition root (app.py) puts together.

* ``enforcement``: what every guard process keeps in memory in step with the store — the
  suppression index, the erasure tombstones — and its audit buffer;
* ``front``: the SMTP listener and what it decides with; one per worker process;
* ``background``: the duties that must run once per guard, not once per worker — the release
  worker, the breaker's sync with the store, statistics, probes, the metrics listener.

One process runs all three (``workers = 1``); with more workers the supervisor runs
``enforcement`` and ``background`` and each worker ``enforcement`` and ``front``.
"""
