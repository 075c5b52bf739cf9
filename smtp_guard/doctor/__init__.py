"""``smtp-guard doctor``: checks the sending domains' DNS (DKIM, SPF, DMARC, MX) and the
upstream (reachable, STARTTLS, certificate), and says for each problem what to publish or fix.

``runner.diagnose`` runs every check and returns a ``report.Report``; one module per record
type (``dkim_record``, ``spf_record`` over the ``spf`` evaluator, ``dmarc_record``,
``mx_record``) and one for the upstream, all asking DNS through ``lookup.DNS``.
"""
