#!/bin/sh
# octaskly installer for Linux (systemd) and macOS (launchd).
#
#   sudo ./install.sh --role dispatcher --pyz ./octaskly.pyz
#   sudo ./install.sh --role worker --dispatcher-addr dispatcher.lan:5555 --name w1 \
#        --secret-file ./secret --pyz ./octaskly.pyz
#   sudo ./install.sh --uninstall [--purge]
#
# What it does (every step is skipped when already done, so re-running changes nothing):
#   /opt/octaskly/bin/octaskly.pyz     the zipapp (0755), checked against a SHA256SUMS
#                                      beside it when there is one (refused on mismatch)
#   /opt/octaskly/bin/octaskly         launcher: the python3 found at install time + the pyz
#   /opt/octaskly/shiv/                the pyz pre-extracted and compiled as root; read-only
#                                      for the service (SHIV_ROOT), no ~/.shiv needed
#   user and group octaskly            system user, no login shell, no home directory
#   /etc/octaskly/          0750 root:octaskly
#   /etc/octaskly/secret    0600 octaskly   cluster secret: 32 random bytes (hex) made
#                                           once, never overwritten (--secret-file copies
#                                           the dispatcher's onto a worker)
#   /etc/octaskly/octaskly.toml  0640 root:octaskly  from `octaskly config init`, only if
#                                           missing; checked with `octaskly config check`
#   /var/lib/octaskly/      0700 octaskly   database, audit log, TLS files, admin token
#   /var/backups/octaskly/  0700 octaskly   daily backups (octaskly-backup.timer)
#   systemd units (dispatcher: octaskly-dispatcher.service, octaskly-backup.{service,timer}
#   and /opt/octaskly/bin/octaskly-backup; worker: octaskly-worker@NAME.service), enabled
#   and started; on macOS a LaunchDaemon plist in /Library/LaunchDaemons.
#
# An upgrade (a different pyz over an existing install) keeps the configuration, the
# secret and the data, and first copies the database with the installed version's
# `octaskly backup` to /var/backups/octaskly/pre-upgrade-<UTC time>.db.
#
# Without --pyz the release is downloaded with curl from $RELEASE_URL (override with the
# environment variable OCTASKLY_RELEASE_URL): $RELEASE_URL/octaskly.pyz and
# $RELEASE_URL/SHA256SUMS, which is then mandatory. The unit files are taken from
# ../systemd/ or ./systemd/ beside this script, else downloaded the same way.
#
# --root DIR installs into DIR (an image being built, a test): every path is prefixed with
# DIR; no user is created, nothing is chowned (the intended owners are written to
# DIR/opt/octaskly/OWNERSHIP instead; modes are set) and no service is touched.
# The pyz needs the CPython minor version it was built for: set PYTHON=/path/to/python3.11
# if `python3` is another version.
set -eu

RELEASE_URL=${OCTASKLY_RELEASE_URL:-https://github.com/adauldev/octaskly/releases/latest/download}
PYTHON=${PYTHON:-python3}

OPT=/opt/octaskly
BIN=$OPT/bin
SHIV=$OPT/shiv
ETC=/etc/octaskly
DATA=/var/lib/octaskly
BACKUPS=/var/backups/octaskly
UNITDIR=/etc/systemd/system
PLISTDIR=/Library/LaunchDaemons
SVC_USER=octaskly

ROLE=dispatcher
DISPATCHER_ADDR=
NAME=
PYZ=
SECRET_FILE=
ROOT=
NO_START=0
DRY_RUN=0
UNINSTALL=0
PURGE=0
CHANGED_PYZ=0
OWNERSHIP=

usage() {
    cat <<'USAGE'
usage: install.sh [--role dispatcher|worker] [--dispatcher-addr HOST:PORT] [--name NAME]
                  [--pyz FILE] [--secret-file FILE] [--root DIR] [--no-start] [--dry-run]
       install.sh --uninstall [--purge] [--root DIR] [--dry-run]

  --role              dispatcher (default) or worker
  --dispatcher-addr   worker: the dispatcher's HOST:PORT (written to the new config;
                      default: discover it on the LAN over mDNS)
  --name              worker: its name, the unit instance octaskly-worker@NAME (default:
                      the host name)
  --pyz FILE          install this zipapp (else download it from $OCTASKLY_RELEASE_URL)
  --secret-file FILE  use this cluster secret when /etc/octaskly/secret does not exist
                      (workers need the dispatcher's)
  --root DIR          install into DIR instead of / (no users, chown or services)
  --no-start          do not enable or start the services
  --dry-run           print what would be done, change nothing
  --uninstall         remove the program and units; keeps /etc/octaskly, /var/lib/octaskly
                      and /var/backups/octaskly unless --purge
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}
say() { echo "install.sh: $*" >&2; }

# run CMD...: run it, or only print it with --dry-run
run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case $1 in
        --role) need_arg "$@"; ROLE=$2; shift 2 ;;
        --role=*) ROLE=${1#*=}; shift ;;
        --dispatcher-addr) need_arg "$@"; DISPATCHER_ADDR=$2; shift 2 ;;
        --dispatcher-addr=*) DISPATCHER_ADDR=${1#*=}; shift ;;
        --name) need_arg "$@"; NAME=$2; shift 2 ;;
        --name=*) NAME=${1#*=}; shift ;;
        --pyz) need_arg "$@"; PYZ=$2; shift 2 ;;
        --pyz=*) PYZ=${1#*=}; shift ;;
        --secret-file) need_arg "$@"; SECRET_FILE=$2; shift 2 ;;
        --secret-file=*) SECRET_FILE=${1#*=}; shift ;;
        --root) need_arg "$@"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --no-start) NO_START=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case $ROLE in
    dispatcher | worker) ;;
    *) die "--role must be dispatcher or worker, not '$ROLE'" ;;
esac
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" = / ] && ROOT=
fi
case $(uname -s) in
    Linux) OS=linux ;;
    Darwin) OS=macos ;;
    *) die "unsupported system $(uname -s) (Linux and macOS; Windows: install.ps1)" ;;
esac
if [ -z "$NAME" ]; then
    NAME=$(hostname 2>/dev/null || uname -n)
    NAME=${NAME%%.*}
fi
case $NAME in
    '' | *[!A-Za-z0-9_.-]*) die "--name '$NAME': use letters, digits, '.', '_' and '-'" ;;
esac
case $DISPATCHER_ADDR in
    *[\"\\\ ]*) die "--dispatcher-addr '$DISPATCHER_ADDR' is not HOST:PORT" ;;
esac

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
if [ -z "$ROOT" ] && [ "$IS_ROOT" = 0 ] && [ "$DRY_RUN" = 0 ]; then
    die "run as root (or with --root DIR, or --dry-run)"
fi
umask 022

# services are only touched on the real root, as root, with a running service manager
MANAGE_SERVICES=0
if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ]; then
    if [ "$OS" = linux ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        MANAGE_SERVICES=1
    elif [ "$OS" = macos ] && command -v launchctl >/dev/null 2>&1; then
        MANAGE_SERVICES=1
    fi
fi

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/octaskly-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# parent_dir DIR: create DIR (under ROOT) 0755 if missing; an existing one is left alone
parent_dir() {
    if [ ! -d "$ROOT$1" ]; then
        run mkdir -p "$ROOT$1"
        run chmod 0755 "$ROOT$1"
    fi
}

# mkdir_mode DIR MODE OWNER: create DIR (under ROOT) with MODE, owned by OWNER (user:group)
mkdir_mode() {
    if [ ! -d "$ROOT$1" ]; then
        run mkdir -p "$ROOT$1"
    fi
    run chmod "$2" "$ROOT$1"
    own "$3" "$1"
}

# own USER:GROUP PATH: chown on a real install; else record the intention
own() {
    if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ]; then
        run chown "$1" "$ROOT$2"
    else
        OWNERSHIP="$OWNERSHIP$1 $2
"
    fi
}

# own_tree USER:GROUP DIR: the same for DIR and everything in it
own_tree() {
    if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ]; then
        run chown -R "$1" "$ROOT$2"
    else
        OWNERSHIP="$OWNERSHIP$1 $2 (recursive)
"
    fi
}

# put SRC DEST MODE OWNER: install SRC's content at DEST (under ROOT) unless identical
put() {
    if [ -f "$ROOT$2" ] && cmp -s "$1" "$ROOT$2"; then
        :
    else
        say "installing $2"
        run cp "$1" "$ROOT$2.new"
        run chmod "$3" "$ROOT$2.new"
        run mv -f "$ROOT$2.new" "$ROOT$2"
    fi
    run chmod "$3" "$ROOT$2"
    own "$4" "$2"
}

# as_service_user CMD...: run CMD as the octaskly user (as ourselves with --root)
as_service_user() {
    if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ]; then
        # from /: the service user may not be able to read the current directory
        if command -v runuser >/dev/null 2>&1; then
            (cd / && run runuser -u "$SVC_USER" -- "$@")
        else
            (cd / && run sudo -u "$SVC_USER" "$@")
        fi
    else
        run "$@"
    fi
}

fetch() {
    command -v curl >/dev/null 2>&1 || die "curl is needed to download $1 (or give --pyz FILE)"
    say "downloading $RELEASE_URL/$1"
    curl -fsSL --proto '=https' --retry 3 -o "$2" "$RELEASE_URL/$1" || die "download of $1 failed"
}

# verify FILE SUMS NAME: the SHA-256 of FILE must be NAME's entry in SUMS
verify() {
    want=$(awk -v n="$3" '{ f = $2; sub(/^\*/, "", f) } f == n { print $1; exit }' "$2")
    [ -n "$want" ] || die "$2 has no entry for $3: refusing to install it"
    got=$(sha256 "$1")
    [ "$got" = "$want" ] || die "SHA-256 mismatch for $1: $got, $2 says $want: refusing to install it"
    say "$3: SHA-256 verified against $2"
}

python_for_pyz() {
    PY=$(command -v "$PYTHON" 2>/dev/null) || die "no $PYTHON found (set PYTHON=/path/to/python3.11)"
    PY=$("$PY" -c 'import sys; print(sys.executable)') || die "$PYTHON does not run"
}

# ---------------------------------------------------------------------------- uninstall
units_for_role() {
    if [ "$OS" = macos ]; then
        echo com.octaskly.dispatcher com.octaskly.worker
    else
        echo octaskly-dispatcher.service octaskly-backup.service octaskly-backup.timer octaskly-worker@.service
    fi
}

uninstall() {
    if [ "$MANAGE_SERVICES" = 1 ]; then
        if [ "$OS" = linux ]; then
            for unit in $(systemctl list-units --all --plain --no-legend 'octaskly-*' | awk '{ print $1 }') \
                octaskly-dispatcher.service octaskly-backup.timer; do
                run systemctl disable --now "$unit" 2>/dev/null || true
            done
        else
            for label in com.octaskly.dispatcher com.octaskly.worker; do
                run launchctl bootout "system/$label" 2>/dev/null || true
            done
        fi
    fi
    for unit in $(units_for_role); do
        if [ "$OS" = macos ]; then f=$PLISTDIR/$unit.plist; else f=$UNITDIR/$unit; fi
        if [ -e "$ROOT$f" ]; then
            say "removing $f"
            run rm -f "$ROOT$f"
        fi
    done
    if [ "$MANAGE_SERVICES" = 1 ] && [ "$OS" = linux ]; then run systemctl daemon-reload; fi
    if [ -e "$ROOT$OPT" ]; then
        say "removing $OPT"
        run rm -rf "$ROOT$OPT"
    fi
    if [ "$PURGE" = 1 ]; then
        for d in "$ETC" "$DATA" "$BACKUPS"; do
            if [ -e "$ROOT$d" ]; then
                say "purging $d"
                run rm -rf "$ROOT$d"
            fi
        done
        if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ] && id "$SVC_USER" >/dev/null 2>&1; then
            if [ "$OS" = linux ]; then
                run userdel "$SVC_USER"
            else
                run dscl . -delete "/Users/$SVC_USER"
                run dscl . -delete "/Groups/$SVC_USER"
            fi
        fi
    else
        say "kept $ETC, $DATA and $BACKUPS (--purge removes them)"
    fi
}

if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi

# ------------------------------------------------------------------------------ install
python_for_pyz

# 1. the zipapp, verified
if [ -n "$PYZ" ]; then
    [ -f "$PYZ" ] || die "--pyz $PYZ: no such file"
    PYZ=$(cd "$(dirname "$PYZ")" && pwd)/$(basename "$PYZ")
    sums="$(dirname "$PYZ")/SHA256SUMS"
    if [ -f "$sums" ]; then
        verify "$PYZ" "$sums" "$(basename "$PYZ")"
    else
        say "warning: no SHA256SUMS beside $PYZ: its checksum is not verified"
    fi
else
    fetch octaskly.pyz "$WORK/octaskly.pyz"
    fetch SHA256SUMS "$WORK/SHA256SUMS"
    verify "$WORK/octaskly.pyz" "$WORK/SHA256SUMS" octaskly.pyz
    PYZ=$WORK/octaskly.pyz
fi
# the pyz holds compiled extensions for one CPython version: check it matches, without
# running (and so extracting) it
"$PY" - "$PYZ" <<'PYCHECK' || die "$PYZ is not for $PY (a pyz needs the CPython version it was built with: set PYTHON=)"
import re, sys, zipfile
tag = sys.implementation.cache_tag  # e.g. cpython-311
names = zipfile.ZipFile(sys.argv[1]).namelist()
built = {m.group(1) for n in names for m in [re.search(r"\.(cpython-\d+)-", n)] if m}
if built and tag not in built:
    sys.exit(f"{sys.argv[1]} was built for {', '.join(sorted(built))}; {sys.executable} is {tag}")
if "environment.json" not in names:
    sys.exit(f"{sys.argv[1]} is not a shiv zipapp")
PYCHECK

# 2. an upgrade: copy the database with the installed version first
if [ -f "$ROOT$BIN/octaskly.pyz" ] && ! cmp -s "$PYZ" "$ROOT$BIN/octaskly.pyz"; then
    CHANGED_PYZ=1
    if [ -f "$ROOT$DATA/octaskly.db" ]; then
        out=$BACKUPS/pre-upgrade-$(date -u +%Y%m%dT%H%M%SZ).db
        say "upgrade: backing up the database to $out"
        [ -d "$ROOT$BACKUPS" ] || run mkdir -p "$ROOT$BACKUPS"
        if ! as_service_user env SHIV_ROOT="$ROOT$SHIV" "$PY" "$ROOT$BIN/octaskly.pyz" backup \
            --db-path "$ROOT$DATA/octaskly.db" --output "$ROOT$out"; then
            say "the installed version has no working 'octaskly backup': using sqlite3's backup API"
            as_service_user "$PY" -c 'import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()' "$ROOT$DATA/octaskly.db" "$ROOT$out" ||
                die "could not back up $DATA/octaskly.db: upgrade stopped, nothing changed"
        fi
    fi
elif [ ! -f "$ROOT$BIN/octaskly.pyz" ]; then
    CHANGED_PYZ=1
fi

# 3. the user
if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ] && ! id "$SVC_USER" >/dev/null 2>&1; then
    say "creating system user $SVC_USER"
    if [ "$OS" = linux ]; then
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        run useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell "$nologin" --comment "octaskly task runner" "$SVC_USER"
    else
        # macOS: a hidden service account with a free id below 500
        uid=$(dscl . -list /Users UniqueID | awk '$2 >= 300 && $2 < 500 { u[$2] = 1 }
            END { for (i = 300; i < 500; i++) if (!(i in u)) { print i; exit } }')
        run dscl . -create "/Groups/$SVC_USER" PrimaryGroupID "$uid"
        run dscl . -create "/Users/$SVC_USER" UniqueID "$uid"
        run dscl . -create "/Users/$SVC_USER" PrimaryGroupID "$uid"
        run dscl . -create "/Users/$SVC_USER" UserShell /usr/bin/false
        run dscl . -create "/Users/$SVC_USER" NFSHomeDirectory /var/empty
        run dscl . -create "/Users/$SVC_USER" IsHidden 1
    fi
fi

# 4. directories
parent_dir /opt
mkdir_mode "$OPT" 0755 root:root
mkdir_mode "$BIN" 0755 root:root
mkdir_mode "$SHIV" 0755 root:root
parent_dir /etc
mkdir_mode "$ETC" 0750 "root:$SVC_USER"
parent_dir /var/lib
mkdir_mode "$DATA" 0700 "$SVC_USER:$SVC_USER"
parent_dir /var/backups
mkdir_mode "$BACKUPS" 0700 "$SVC_USER:$SVC_USER"

# 5. stop the services before their files change
if [ "$CHANGED_PYZ" = 1 ] && [ "$MANAGE_SERVICES" = 1 ] && [ "$OS" = linux ]; then
    for unit in $(systemctl list-units --plain --no-legend --state=active 'octaskly-*' | awk '{ print $1 }'); do
        run systemctl stop "$unit"
    done
fi

# 6. the pyz, the launcher, the pre-extracted dependencies (root-owned, read-only to others)
put "$PYZ" "$BIN/octaskly.pyz" 0755 root:root
cat >"$WORK/octaskly" <<EOF
#!/bin/sh
# octaskly launcher (written by install.sh): the interpreter the pyz was installed with,
# and its dependencies pre-extracted in SHIV_ROOT (default: ../shiv beside this file).
case \$0 in */*) here=\${0%/*} ;; *) here=$BIN ;; esac
SHIV_ROOT=\${SHIV_ROOT:-\$here/../shiv}
export SHIV_ROOT
exec $PY "\$here/octaskly.pyz" "\$@"
EOF
put "$WORK/octaskly" "$BIN/octaskly" 0755 root:root
if [ "$CHANGED_PYZ" = 1 ] || [ -z "$(ls -A "$ROOT$SHIV" 2>/dev/null)" ]; then
    say "extracting the pyz into $SHIV"
    run find "$ROOT$SHIV" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    run env SHIV_ROOT="$ROOT$SHIV" "$PY" "$ROOT$BIN/octaskly.pyz" --version >&2
    run "$PY" -m compileall -q -j 0 "$ROOT$SHIV"
    run chmod -R u+rwX,go+rX,go-w "$ROOT$SHIV"
fi
own_tree root:root "$SHIV"

# 7. the secret: made once, never overwritten
if [ -f "$ROOT$ETC/secret" ]; then
    :
elif [ -n "$SECRET_FILE" ]; then
    [ -f "$SECRET_FILE" ] || die "--secret-file $SECRET_FILE: no such file"
    say "installing $ETC/secret from $SECRET_FILE"
    (umask 077 && run cp "$SECRET_FILE" "$ROOT$ETC/secret")
else
    say "generating $ETC/secret (32 random bytes)"
    if [ "$ROLE" = worker ]; then
        say "warning: a worker needs the dispatcher's secret: copy its $ETC/secret here"
    fi
    if [ "$DRY_RUN" = 0 ]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$ROOT$ETC/secret.new" &&
            mv "$ROOT$ETC/secret.new" "$ROOT$ETC/secret")
    fi
fi
[ -f "$ROOT$ETC/secret" ] && run chmod 0600 "$ROOT$ETC/secret"
own "$SVC_USER:$SVC_USER" "$ETC/secret"

# 8. the configuration: only if missing
oct() { env SHIV_ROOT="$ROOT$SHIV" "$PY" "$ROOT$BIN/octaskly.pyz" "$@"; }
if [ ! -f "$ROOT$ETC/octaskly.toml" ] && [ "$DRY_RUN" = 1 ]; then
    echo "would write $ETC/octaskly.toml (octaskly config init)"
elif [ ! -f "$ROOT$ETC/octaskly.toml" ]; then
    say "writing $ETC/octaskly.toml"
    oct config init --output "$WORK/octaskly.toml" >/dev/null 2>&1 || die "octaskly config init failed"
    sed -e "s|^# secret_key_file = .*|secret_key_file = \"$ETC/secret\"|" \
        -e "s|^# data_dir = .*|data_dir = \"$DATA\"|" \
        "$WORK/octaskly.toml" >"$WORK/octaskly.toml.1"
    if [ "$ROLE" = worker ]; then
        sed -e "s|^dispatcher_addr = \[\]|dispatcher_addr = [${DISPATCHER_ADDR:+\"$DISPATCHER_ADDR\"}]|" \
            "$WORK/octaskly.toml.1" >"$WORK/octaskly.toml.2"
        if command -v bwrap >/dev/null 2>&1; then
            # tasks in bubblewrap: the secret, the data and the homes are hidden from them
            sed -e 's|^sandbox_level = "basic"|sandbox_level = "strict"|' \
                "$WORK/octaskly.toml.2" >"$WORK/octaskly.toml.1"
        else
            say "warning: no bubblewrap (bwrap): tasks run unsandboxed as $SVC_USER and can read" \
                "$ETC/secret; install bubblewrap and set sandbox_level = \"strict\""
            mv "$WORK/octaskly.toml.2" "$WORK/octaskly.toml.1"
        fi
    fi
    oct config check "$WORK/octaskly.toml.1" >/dev/null || die "the generated configuration is invalid"
    put "$WORK/octaskly.toml.1" "$ETC/octaskly.toml" 0640 "root:$SVC_USER"
else
    own "root:$SVC_USER" "$ETC/octaskly.toml"
    if [ "$ROLE" = worker ] && [ -n "$DISPATCHER_ADDR" ]; then
        say "keeping the existing $ETC/octaskly.toml (--dispatcher-addr is not written into it)"
    fi
fi

# 9. service definitions
unit_source() {
    for d in "$SCRIPT_DIR/../systemd" "$SCRIPT_DIR/systemd"; do
        if [ -f "$d/$1" ]; then
            echo "$d/$1"
            return
        fi
    done
    [ -f "$WORK/SHA256SUMS" ] || fetch SHA256SUMS "$WORK/SHA256SUMS"
    fetch "$1" "$WORK/$1"
    verify "$WORK/$1" "$WORK/SHA256SUMS" "$1"
    echo "$WORK/$1"
}

write_plist() { # LABEL ARGS...: a LaunchDaemon running the launcher
    label=$1
    shift
    {
        cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>$label</string>
  <key>ProgramArguments</key>
  <array>
    <string>$BIN/octaskly</string>
EOF
        for a in "$@"; do echo "    <string>$a</string>"; done
        cat <<EOF
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>SHIV_ROOT</key><string>$SHIV</string>
    <key>OCTASKLY_SECRET_KEY_FILE</key><string>$ETC/secret</string>
  </dict>
  <key>UserName</key><string>$SVC_USER</string>
  <key>GroupName</key><string>$SVC_USER</string>
  <key>WorkingDirectory</key><string>$DATA</string>
  <key>Umask</key><integer>63</integer>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>StandardOutPath</key><string>$DATA/$label.log</string>
  <key>StandardErrorPath</key><string>$DATA/$label.log</string>
</dict>
</plist>
EOF
    } >"$WORK/$label.plist"
    parent_dir "$PLISTDIR"
    put "$WORK/$label.plist" "$PLISTDIR/$label.plist" 0644 root:wheel
}

ENABLE=
if [ "$OS" = linux ]; then
    parent_dir "$UNITDIR"
    if [ "$ROLE" = dispatcher ]; then
        for unit in octaskly-dispatcher.service octaskly-backup.service octaskly-backup.timer; do
            put "$(unit_source "$unit")" "$UNITDIR/$unit" 0644 root:root
        done
        put "$(unit_source octaskly-backup)" "$BIN/octaskly-backup" 0755 root:root
        ENABLE="octaskly-dispatcher.service octaskly-backup.timer"
    else
        put "$(unit_source octaskly-worker@.service)" "$UNITDIR/octaskly-worker@.service" 0644 root:root
        ENABLE="octaskly-worker@$NAME.service"
    fi
else
    if [ "$ROLE" = dispatcher ]; then
        write_plist com.octaskly.dispatcher dispatcher --config "$ETC/octaskly.toml" --data-dir "$DATA"
    else
        write_plist com.octaskly.worker worker --config "$ETC/octaskly.toml" --name "$NAME"
    fi
    ENABLE=com.octaskly.$ROLE
fi

# 10. who should own what, where we could not chown
if [ -n "$OWNERSHIP" ] && [ "$DRY_RUN" = 0 ]; then
    printf '# owner path: intended ownership of the files install.sh wrote (not applied:\n# installed with --root or not as root)\n%s' "$OWNERSHIP" >"$WORK/OWNERSHIP"
    put "$WORK/OWNERSHIP" "$OPT/OWNERSHIP" 0644 root:root >/dev/null
fi

# 11. services
if [ "$MANAGE_SERVICES" = 1 ] && [ "$NO_START" = 0 ]; then
    if [ "$OS" = linux ]; then
        run systemctl daemon-reload
        # shellcheck disable=SC2086 # a list of unit names
        run systemctl enable $ENABLE
        # shellcheck disable=SC2086
        run systemctl restart $ENABLE
    else
        run launchctl bootout "system/$ENABLE" 2>/dev/null || true
        run launchctl bootstrap system "$PLISTDIR/$ENABLE.plist"
    fi
    say "started $ENABLE"
else
    if [ "$OS" = linux ]; then
        say "services not started; to start them: systemctl daemon-reload && systemctl enable --now $ENABLE"
    else
        say "service not started; to start it: launchctl bootstrap system $PLISTDIR/$ENABLE.plist"
    fi
fi
say "done"
