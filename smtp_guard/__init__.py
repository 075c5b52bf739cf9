"""smtp-guard: an SMTP smarthost relay that enforces suppression lists at the last hop."""

__version__ = "0.1.0"
