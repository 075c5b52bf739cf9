"""``python -m smtp_guard``: the same as the ``smtp-guard`` command."""

from .cli.main import main

main(prog_name="smtp-guard")
