# Shared set-up for the README's commands. Sourced, not run. Every step is idempotent: it checks
# first and does only what is missing, so running a command twice costs seconds, not minutes.
#
# Honoured: DOCKER_HOST (an engine elsewhere: never installed or started here),
#           DOCKYARD_VENV (default: .venv in the checkout), PYTHON (interpreter for the venv),
#           DOCKYARD_DOCKERD_LOG (default: /var/log/dockyard-dockerd.log).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DOCKYARD_VENV:-$ROOT/.venv}"
DOCKERD_LOG="${DOCKYARD_DOCKERD_LOG:-/var/log/dockyard-dockerd.log}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$1" >&2; [ $# -gt 1 ] && printf '  hint: %s\n' "$2" >&2; exit 3; }
is_root() { [ "$(id -u)" = 0 ]; }

# Install Debian packages that are missing (only as root with apt; otherwise say what to install).
apt_ensure() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if is_root && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    # The lists may be missing or stale on a fresh machine; one update is cheap next to a failed install.
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    die "missing packages: ${missing[*]}" "install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and rerun"
  fi
}

pick_python() {
  local cand
  for cand in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null || continue
    if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  die "dockyard needs Python >= 3.11" "install python3.11 or newer, or set PYTHON=/path/to/python3"
}

# A virtualenv with dockyard installed editable (+ test extras). The "strict" editable mode puts a
# tree of symlinks on sys.path instead of an import hook: edits show at once, and every dockyard
# process starts ~25 ms sooner (the hook's imports cost more than a whole cache hit). A new or
# removed module needs a reinstall, so the stamp covers the file list as well as pyproject.toml.
ensure_venv() {
  local stamp="$VENV/.dockyard-installed" want
  want="$( (cat "$ROOT/pyproject.toml"; cd "$ROOT" && find engine cache proto -name '*.py' | sort) | sha256sum | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$(pick_python)" -m venv "$VENV" || die "could not create a virtualenv" "install python3-venv"
  fi
  say "installing dockyard (editable) into $VENV"
  if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[test,gpu,conda,plot,ray]" --config-settings editable_mode=strict \
       >"$VENV/pip-install.log" 2>&1 \
     || ! "$VENV/bin/python" -c 'import dockyard, dockyard.cache, dockyard.proto'; then
    tail -n 30 "$VENV/pip-install.log" >&2
    die "the editable install of dockyard failed" "the full pip log is $VENV/pip-install.log"
  fi
  # Byte-compile the symlink tree as pip does an installed package: with PYTHONDONTWRITEBYTECODE
  # set, nothing else would, and every dockyard process would compile its modules again.
  "$VENV/bin/python" -m compileall -q "$ROOT"/build/__editable__*/dockyard >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
}

engine_ping() {
  "$VENV/bin/python" -c 'from dockyard.dockerd import EngineClient; EngineClient.from_env().ping()' 2>/dev/null
}

# A Docker Engine that answers /_ping: the one at DOCKER_HOST, else a local dockerd we start.
ensure_engine() {
  engine_ping && return 0
  if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "unix:///var/run/docker.sock" ]; then
    die "no Docker Engine answers at DOCKER_HOST=$DOCKER_HOST" "start that engine, or unset DOCKER_HOST to use a local one"
  fi
  if ! command -v dockerd >/dev/null; then
    if is_root && command -v apt-get >/dev/null; then
      apt_ensure docker.io
    else
      die "no Docker Engine is installed" \
        "install Docker Engine (Debian/Ubuntu: sudo apt-get install docker.io; elsewhere see docs.docker.com/engine/install) and start it"
    fi
  fi
  is_root || die "dockerd is installed but not running" "start it: sudo systemctl start docker (or: sudo dockerd &)"
  # One lock so two set-ups at once never start two daemons.
  exec 9>/run/dockyard-dockerd.lock
  flock 9
  if ! engine_ping; then
    if pgrep -x dockerd >/dev/null; then
      say "dockerd is starting; waiting for it"
    elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null && systemctl start docker 9>&- 2>/dev/null; then
      say "started docker.service"
    else
      say "starting dockerd in the background (log: $DOCKERD_LOG)"
      mkdir -p "$(dirname "$DOCKERD_LOG")"
      # 9>&- : the daemon must not inherit (and hold forever) the set-up lock.
      nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    fi
    local i
    for i in $(seq 1 120); do
      engine_ping && break
      sleep 0.5
    done
    engine_ping || { tail -n 20 "$DOCKERD_LOG" >&2 2>/dev/null || true
                     die "dockerd did not answer /_ping within 60 s" "read $DOCKERD_LOG"; }
  fi
  flock -u 9
  say "Docker Engine is up"
}

# Base images made locally (no registry is needed): busybox for fast tests, python for real envs.
ensure_base_images() {
  local flavor
  for flavor in busybox python; do
    "$VENV/bin/dockyard" base bootstrap --flavor "$flavor" >&2
  done
}

# Host tools that `dockyard base bootstrap` and the registry tests use.
ensure_host_tools() {
  if is_root && command -v apt-get >/dev/null; then
    apt_ensure debootstrap busybox-static docker-registry apache2-utils
  fi
}

setup_all() {
  ensure_venv
  ensure_host_tools
  ensure_engine
  ensure_base_images
}
