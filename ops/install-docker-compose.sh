#!/usr/bin/env bash
# Install Debian's docker-compose (the client only: no engine) so tests/test_deploy.py can
# validate docker-compose.yml offline with `docker-compose config -q`. Idempotent.
# --no-install-recommends keeps apt from pulling in docker.io, containerd and runc.
set -euo pipefail
say() { echo "install-docker-compose: $*"; }
die() { echo "install-docker-compose: error: $*" >&2; exit 1; }

if command -v docker-compose >/dev/null 2>&1; then
    say "already installed: $(docker-compose version --short 2>/dev/null || echo present)"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install docker-compose >= 1.29 by hand"
if [ "$(id -u)" -eq 0 ]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
    die "need root (or password-less sudo) to install docker-compose"; fi
install() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; }
if ! install; then
    say "install failed; refreshing the package lists and retrying"
    "${SUDO[@]}" apt-get update -q || die "apt-get update failed"
    install || die "apt-get install docker-compose failed"
fi
command -v docker-compose >/dev/null 2>&1 || die "docker-compose installed but not on PATH"
