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

# The same user name as the systemd unit's (config/smtp-guard.service).
RUN groupadd --system smtp-guard \
 && useradd --system --gid smtp-guard --home-dir /var/lib/smtp-guard --no-create-home \
            --shell /usr/sbin/nologin smtp-guard

# Only what the package build needs (see .dockerignore); the source is removed after install.
COPY pyproject.toml constraints.txt README.md /tmp/src/
COPY smtp_guard /tmp/src/smtp_guard
RUN pip install -c /tmp/src/constraints.txt /tmp/src && rm -rf /tmp/src

COPY config/docker.toml /etc/smtp-guard/smtp-guard.toml
# Ownership must be set before VOLUME: later changes to a volume path are discarded.
RUN mkdir -p /var/lib/smtp-guard \
 && chown smtp-guard:smtp-guard /var/lib/smtp-guard \
 && chmod 0700 /var/lib/smtp-guard \
 && chown root:smtp-guard /etc/smtp-guard/smtp-guard.toml \
 && chmod 0640 /etc/smtp-guard/smtp-guard.toml
# Only the data is a volume: the config comes with the image (or a bind mount of yours), so an
# upgraded image never runs with a config left behind in an old volume.
VOLUME ["/var/lib/smtp-guard"]

USER smtp-guard
WORKDIR /var/lib/smtp-guard

# 2525: SMTP from the sending platform; 9425: /metrics, /healthz, /readyz.
EXPOSE 2525 9425

# Liveness on the default [metrics] listen port; change it here too if you move the listener.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9425/healthz', timeout=4).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-guard"]
# SMTP_GUARD_CONFIG names the config for `serve` and for every admin command run with
# `docker exec CONTAINER smtp-guard …`, so they all use the same store.
CMD ["serve"]
