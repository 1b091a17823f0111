#!/usr/bin/env bash
# Install, upgrade or remove the appliance as a systemd service.
#
#   sudo systemd/install.sh                 install or upgrade from this checkout, enable and (re)start the service
#   sudo systemd/install.sh --uninstall     remove the program and units; keep /etc/appliance, state and cache
#   sudo systemd/install.sh --uninstall --purge   also remove config, state (models), cache and the user
#
# Options:
#   --root DIR        install into DIR instead of / (an image being built, or a test); nothing is started there
#   --source SPEC     what pip installs into the venv (default: this checkout)
#   --python PY       interpreter for the venv (default: python3)
#   --pip-args ARGS   extra arguments for pip install (e.g. "--no-index --find-links /media/wheels" offline)
#   --no-start        enable the units but do not (re)start the service
#
# An upgrade is the same command: the venv and the unit files are replaced; /etc/appliance/config.toml and
# /etc/appliance/env are written only when absent, never overwritten (the shipped default is refreshed beside them
# as config.toml.dist). Change unit settings with drop-ins (systemctl edit appliance), not by editing the units.
set -euo pipefail

ROOT=/
SOURCE=""
PYTHON=python3
PIP_ARGS=""
ACTION=install
PURGE=0
START=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a path or requirement}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        --pip-args) PIP_ARGS="${2?--pip-args needs a value}"; shift 2 ;;
        --no-start) START=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
[ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || die "--purge only goes with --uninstall"
[ "$(id -u)" = 0 ] || [ "$ROOT" != / ] || die "run as root (sudo), or give --root DIR"
ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
R="${ROOT%/}"  # prefix for paths; empty for the real root
LIVE=0         # whether to talk to a running systemd
if [ -z "$R" ] && [ -d /run/systemd/system ]; then LIVE=1; fi

PREFIX="$R/opt/appliance"
CONFIG_DIR="$R/etc/appliance"
UNIT_DIR="$R/etc/systemd/system"
SYSUSERS="$R/etc/sysusers.d/appliance.conf"
UNITS=(appliance.service appliance-build.service)

say() { echo "install.sh: $*"; }

create_user() {
    mkdir -p "$(dirname "$SYSUSERS")"
    echo 'u appliance - "appliance inference server" /var/lib/appliance /usr/sbin/nologin' > "$SYSUSERS"
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers --root="$ROOT" "$SYSUSERS"
    elif ! getent passwd appliance >/dev/null; then
        [ -z "$R" ] || die "creating the user under --root needs systemd-sysusers (apt-get install systemd)"
        useradd --system --user-group --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance
    fi
}

install_venv() {
    # A new venv beside the old one, swapped in at the end, so that a failed upgrade leaves the old one working.
    local next="$PREFIX/venv.new"
    rm -rf "$next"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$next"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$next/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "${SOURCE:-$HERE/..}"
    # venv writes absolute paths into its scripts: fix them for where the venv will live on the target system.
    grep -rlF "$next" "$next/bin" | xargs -r sed -i "s#$next#/opt/appliance/venv#g"
    rm -rf "$PREFIX/venv.old"
    if [ -d "$PREFIX/venv" ]; then mv "$PREFIX/venv" "$PREFIX/venv.old"; fi
    mv "$next" "$PREFIX/venv"
    rm -rf "$PREFIX/venv.old"
    mkdir -p "$R/usr/local/bin"
    ln -sfn /opt/appliance/venv/bin/appliance "$R/usr/local/bin/appliance"
    for doc in README.md DESIGN.md; do  # the units' Documentation=; the README links the design
        if [ -f "$HERE/../$doc" ]; then cp "$HERE/../$doc" "$PREFIX/$doc"; fi
    done
}

default_config() {
    cat <<'EOF'
# The appliance's configuration. Every setting and its default: `appliance config`, and the README.
# This file is yours: upgrades never overwrite it (the shipped default is kept beside it as config.toml.dist).
# After a change: `systemctl reload appliance` (settings that need a restart are named in the log).

[server]
# Loopback only. Without API keys the server answers local callers alone, each as the operator; once a key exists
# every request needs one (Authorization: Bearer <key>). To listen beyond loopback (host = "0.0.0.0"), create keys
# first, as the service user; the server refuses to start beyond loopback without one:
#   sudo -u appliance appliance --config /etc/appliance/config.toml keys create --name ops --tenant ops --admin
host = "127.0.0.1"
port = 8000
drain_timeout_s = 30.0        # keep below the unit's TimeoutStopSec (90 s)

[paths]
state_dir = "/var/lib/appliance"
cache_dir = "/var/cache/appliance"
EOF
}

default_env() {
    cat <<'EOF'
# Environment for the appliance service (read by systemd; KEY=value lines).
# Any setting can be given here as APPLIANCE_<SECTION>_<SETTING>, e.g. APPLIANCE_SERVER_PORT=9000.
# Changes here need `systemctl restart appliance`.
EOF
}

# Write $2's output to $1 only when $1 is absent; always refresh $1.dist so that an edited file can be compared.
install_config_file() {
    local target="$1" writer="$2" mode="$3"
    "$writer" > "$target.dist"
    if [ -e "$target" ]; then
        if ! cmp -s "$target" "$target.dist"; then say "kept your $target (the shipped default is $target.dist)"; fi
    else
        install -m "$mode" "$target.dist" "$target"
        say "wrote $target"
    fi
}

install_config() {
    mkdir -p "$CONFIG_DIR"
    install_config_file "$CONFIG_DIR/config.toml" default_config 0640
    install_config_file "$CONFIG_DIR/env" default_env 0640
    # The service reads its config as group appliance (numeric, so that it also holds under --root).
    local gid
    gid="$(awk -F: '$1 == "appliance" { print $3 }' "$R/etc/group" 2>/dev/null || true)"
    if [ -n "$gid" ]; then chgrp "$gid" "$CONFIG_DIR" "$CONFIG_DIR/config.toml" "$CONFIG_DIR/env"; fi
    chmod 0750 "$CONFIG_DIR"
}

install_units() {
    mkdir -p "$UNIT_DIR"
    for unit in "${UNITS[@]}"; do install -m 0644 "$HERE/$unit" "$UNIT_DIR/$unit"; done
    if [ "$LIVE" = 1 ]; then systemctl daemon-reload; fi
    systemctl --root="$ROOT" enable "${UNITS[@]}" 2>/dev/null \
        || { [ "$LIVE" = 1 ] && systemctl enable "${UNITS[@]}"; } \
        || die "could not enable the units (systemctl --root=$ROOT enable ${UNITS[*]})"
    if [ "$LIVE" = 1 ] && [ "$START" = 1 ]; then
        systemctl restart appliance.service
        say "started: systemctl status appliance; logs: journalctl -u appliance -f; check: appliance doctor"
    fi
}

uninstall() {
    if [ "$LIVE" = 1 ]; then systemctl disable --now "${UNITS[@]}" 2>/dev/null || true; fi
    systemctl --root="$ROOT" disable "${UNITS[@]}" 2>/dev/null || true
    for unit in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$unit"; done
    if [ "$LIVE" = 1 ]; then systemctl daemon-reload; fi
    rm -rf "$PREFIX"
    if [ "$(readlink "$R/usr/local/bin/appliance" 2>/dev/null)" = /opt/appliance/venv/bin/appliance ]; then
        rm -f "$R/usr/local/bin/appliance"
    fi
    if [ "$PURGE" = 1 ]; then
        rm -rf "$CONFIG_DIR" "$R/var/lib/appliance" "$R/var/cache/appliance" "$UNIT_DIR"/appliance*.service.d
        rm -f "$SYSUSERS"
        if [ -z "$R" ]; then
            if getent passwd appliance >/dev/null; then userdel appliance; fi
        else
            for file in passwd shadow group gshadow; do
                if [ -f "$R/etc/$file" ]; then sed -i '/^appliance:/d' "$R/etc/$file"; fi
            done
        fi
        say "removed the appliance, its configuration, models, cache and user"
    else
        say "removed the program and units; kept $CONFIG_DIR, $R/var/lib/appliance (models) and $R/var/cache/appliance"
    fi
}

if [ "$ACTION" = uninstall ]; then
    uninstall
else
    create_user
    install_venv
    install_config
    install_units
    say "installed into $ROOT"
fi
