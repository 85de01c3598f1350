#!/usr/bin/env bash
# Install Prometheus and promtool from the Debian package `prometheus`, for tests/ops.
#
# Idempotent: does nothing but the daemon check when promtool and prometheus are on PATH.
# The tests start their own Prometheus processes on free loopback ports, so no system
# Prometheus may keep running: the package's service is kept from starting during the
# install and stopped (and disabled) if it runs anyway. Exits non-zero with a message when
# it cannot install (not root and no password-less sudo, no apt-get, package missing).
set -euo pipefail

PACKAGE=prometheus
SERVICES=(prometheus prometheus-node-exporter)

say() { echo "install-prometheus: $*"; }
die() { echo "install-prometheus: error: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root (or password-less sudo) to run: $*"
    fi
}

# Stop the package's daemons if the init system started them (by service name / pidfile,
# never by process name), and keep them from starting at boot.
stop_daemons() {
    local svc pidfile pid
    for svc in "${SERVICES[@]}"; do
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            if systemctl list-unit-files "$svc.service" >/dev/null 2>&1; then
                as_root systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
            fi
        elif [ -x "/etc/init.d/$svc" ]; then
            as_root "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
        pidfile="/run/$svc/$svc.pid"
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile" 2>/dev/null || true)"
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                say "stopping $svc daemon (pid $pid)"
                as_root kill "$pid" || true
            fi
        fi
    done
    # Anything the package's service user still runs is a daemon we failed to stop.
    if id prometheus >/dev/null 2>&1 && pgrep -u prometheus >/dev/null 2>&1; then
        die "a process of user 'prometheus' is still running (pids: $(pgrep -u prometheus | tr '\n' ' ')); stop it"
    fi
}

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    stop_daemons
    say "already installed: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Prometheus >= 2.42 (prometheus and promtool on PATH) by hand"

# Keep invoke-rc.d / deb-systemd-invoke from starting services during the install
# (only where no policy is in place already; ours is removed again on exit).
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $POLICY && chmod 755 $POLICY"
    trap 'as_root rm -f "$POLICY"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$PACKAGE"; }
if ! apt_install; then
    say "install failed; refreshing the package lists and retrying"
    as_root apt-get update -q || die "apt-get update failed"
    apt_install || die "apt-get install $PACKAGE failed"
fi

stop_daemons
command -v promtool >/dev/null 2>&1 || die "package $PACKAGE installed but promtool is not on PATH"
command -v prometheus >/dev/null 2>&1 || die "package $PACKAGE installed but prometheus is not on PATH"
say "installed: $(prometheus --version 2>&1 | head -n 1)"
