# smtp-guard container image.
#
#   docker build -t smtp-guard .
#   docker run -p 2525:2525 -p 127.0.0.1:9425:9425 -v smtp-guard-data:/var/lib/smtp-guard \
#     -e SMTP_GUARD__UPSTREAM__MODE=smtp -e SMTP_GUARD__UPSTREAM__HOST=mx.internal.example smtp-guard
#
# The built-in config is config/docker.toml (sandbox upstream until told otherwise); mount your
# own at /etc/smtp-guard/smtp-guard.toml. Admin commands: `docker exec CONTAINER smtp-guard
# suppress add …` uses the same config and store as the server (SMTP_GUARD_CONFIG is set). On stop the guard finishes sessions in flight for up to
# [smtp] shutdown_grace (30 s): give `docker stop` / Kubernetes a longer timeout than that.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SMTP_GUARD_CONFIG=/etc/smtp-guard/smtp-guard.toml

RUN groupadd --system smtpguard \
 && useradd --system --gid smtpguard --home-dir /var/lib/smtp-guard --no-create-home \
            --shell /usr/sbin/nologin smtpguard

# Only what the package build needs (see .dockerignore); the source is removed after install.
COPY pyproject.toml constraints.txt README.md /tmp/src/
COPY smtp_guard /tmp/src/smtp_guard
RUN pip install -c /tmp/src/constraints.txt /tmp/src && rm -rf /tmp/src

COPY config/docker.toml /etc/smtp-guard/smtp-guard.toml
# Ownership must be set before VOLUME: later changes to a volume path are discarded.
RUN mkdir -p /var/lib/smtp-guard \
 && chown smtpguard:smtpguard /var/lib/smtp-guard \
 && chmod 0700 /var/lib/smtp-guard \
 && chmod 0644 /etc/smtp-guard/smtp-guard.toml
VOLUME ["/etc/smtp-guard", "/var/lib/smtp-guard"]

USER smtpguard
WORKDIR /var/lib/smtp-guard

# 2525: SMTP from the sending platform; 9425: /metrics, /healthz, /readyz.
EXPOSE 2525 9425

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9425/healthz', timeout=4).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-guard"]
# SMTP_GUARD_CONFIG names the config for `serve` and for every admin command run with
# `docker exec CONTAINER smtp-guard …`, so they all use the same store.
CMD ["serve"]
