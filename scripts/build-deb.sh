#!/usr/bin/env bash
# Build Baton's Debian package, dist/baton_VERSION_ARCH.deb (`make deb`).
#
# Usage: scripts/build-deb.sh [--revision REV] [--out DIR] [--worktree] [--wheels DIR] [--fast]
#   --revision REV  Debian revision (default $BATON_DEB_REVISION or 1); the package version is UPSTREAM-REV,
#                   UPSTREAM being pyproject.toml's version. Bump it (1 -> 2, or 1+local2) for a rebuild.
#   --out DIR       where the .deb goes (default dist/)
#   --worktree      package the working tree as it is; the default is the committed HEAD (git archive), so
#                   uncommitted edits never ship by accident
#   --wheels DIR    take the wheels from DIR (an earlier build's BUILD_DIR/wheels) instead of building them
#   --fast          gzip -1 instead of xz (a bigger .deb, built faster: for tests)
# BATON_DEB_BUILD_DIR (default build/deb) is the scratch directory; it is emptied first.
#
# What it makes (packaging/deb/README.Debian has the layout and the upgrade rules):
#   * a virtual environment on the system's /usr/bin/python3.11 with Baton's wheel and its dependencies' wheels
#     (pinned to the versions the checkout's .venv runs, which the tests ran), built at a staging path and made
#     to run at /opt/baton/VERSION: shebangs rewritten, byte code compiled for that path (unchecked-hash .pyc,
#     so no .pyc is ever rewritten at run time); dpkg installs it at /usr/lib/baton/runtime/VERSION and the
#     postinst hard-links it to /opt/baton/VERSION;
#   * /usr/bin/baton, ocf:baton:disk, the systemd units (with /usr/bin/baton), man pages from --help
#     (packaging/man/gen_man.py), the Grafana dashboard and Prometheus rules, docs;
#   * maintainer scripts from packaging/deb/ and md5sums (dpkg --verify).
# Plain dpkg-deb: no debhelper, no source package. Needs the system's python3.11 and the checkout's .venv
# (for pip); both are installed here when missing (root). Wheels come from PyPI through pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD

rev=${BATON_DEB_REVISION:-1}
out=dist
from=head
wheels=""
compress=(-Zxz -z3)
while [ $# -gt 0 ]; do
  case "$1" in
    --revision) rev=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --worktree) from=worktree; shift ;;
    --wheels) wheels=$(realpath "$2"); shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$rev" in
  ''|*[!A-Za-z0-9.+~]*) echo "build-deb: --revision '$rev': use digits, letters, '.', '+' or '~'" >&2; exit 2 ;;
esac

# ---- build needs
need=()
[ -x /usr/bin/python3.11 ] || need+=(python3.11)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "build-deb: needs ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "build-deb: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || scripts/setup.sh runtime
PY=/usr/bin/python3.11
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

upstream=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
version="$upstream-$rev"
arch=$(dpkg --print-architecture)
opt="/opt/baton/$version"
build="${BATON_DEB_BUILD_DIR:-$TOP/build/deb}"
rm -rf "$build"
mkdir -p "$build/src" "$build/wheels" "$out"
umask 022

# ---- the source: HEAD (default) or the working tree
if [ "$from" = head ]; then
  git archive --format=tar HEAD | tar -x -C "$build/src"
  commit=$(git rev-parse HEAD)
  export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct HEAD)}
else
  # Tracked files and new ones that .gitignore does not exclude (no caches, no .venv, no build output).
  git ls-files -z --cached --others --exclude-standard | tar -c --null -T - --ignore-failed-read 2>/dev/null \
    | tar -x -C "$build/src"
  commit="$(git rev-parse HEAD 2>/dev/null || echo unknown) + working tree"
  export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
fi
echo "build-deb: baton $version ($arch) from $commit" >&2

# ---- the runtime: a venv on the system's python3.11, from wheels
stage="$build/root"
rt="$stage/usr/lib/baton/runtime/$version"
mkdir -p "$(dirname "$rt")"
$PY -m venv --without-pip "$rt"
# Dependencies pinned to what the checkout's .venv runs (what the tests ran against), where it has them.
"${PIP[@]}" freeze --exclude-editable | grep -v -e ' @ ' -e '^baton==' > "$build/constraints.txt" || true
if [ -n "$wheels" ]; then
  cp "$wheels"/*.whl "$build/wheels/"
else
  "${PIP[@]}" --python "$rt/bin/python" wheel -q --wheel-dir "$build/wheels" -c "$build/constraints.txt" \
    "$build/src" 2>&1 | grep -v -e "is ignored: it is neither" -e "^$" >&2 || true
fi
ls "$build/wheels"/baton-"$upstream"-*.whl >/dev/null 2>&1 || { echo "build-deb: building the wheels failed" >&2; exit 1; }
"${PIP[@]}" --python "$rt/bin/python" install -q --no-index --find-links "$build/wheels" --no-compile \
  --no-warn-script-location "baton==$upstream"
rm -rf "$build/src/build" "$build/src/src/baton.egg-info"
# Run at $opt, not at the staging path: shebangs, pyvenv.cfg; nothing for activating by hand.
rm -f "$rt"/bin/activate* "$rt"/bin/Activate.ps1
# pip writes '#!STAGING/bin/python', or, for a long staging path, a '#!/bin/sh' preamble that execs
# STAGING/bin/python: either way each script starts with '#!/opt/baton/VERSION/bin/python' here.
$PY - "$rt" "$opt" <<'PYEOF'
import sys
from pathlib import Path
rt, opt = sys.argv[1].encode(), sys.argv[2].encode()
for f in Path(sys.argv[1], "bin").iterdir():
    if f.is_symlink() or not f.is_file():
        continue
    lines = f.read_bytes().split(b"\n")
    if lines[0] == b"#!/bin/sh" and len(lines) > 2 and lines[1].startswith(b"'''exec'"):
        lines = [b"#!" + rt + b"/bin/python", *lines[3:]]
    if lines[0].startswith(b"#!" + rt + b"/"):
        lines[0] = lines[0].replace(rt, opt, 1)
        f.write_bytes(b"\n".join(lines))
PYEOF
sed -i "s|$rt|$opt|g" "$rt/pyvenv.cfg"
if left=$(grep -rlF "$rt" "$rt" 2>/dev/null); then
  echo "build-deb: the staging path is still written in:" >&2; echo "$left" >&2; exit 1
fi

# ---- man pages, from the code that ships (before byte-compiling: nothing may write .pyc into the tree)
PYTHONDONTWRITEBYTECODE=1 "$rt/bin/python" "$build/src/packaging/man/gen_man.py" "$stage/usr/share/man/man8" \
  --version "$version"
gzip -9n "$stage"/usr/share/man/man8/*.8
find "$rt" -name __pycache__ -prune -exec rm -rf {} +

# Byte code for the final path; unchecked-hash: valid whatever the files' times, never rewritten.
"$rt/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$rt" -p "$opt" "$rt/lib" >/dev/null

# ---- everything else
install -D -m 755 "$build/src/packaging/ocf/disk" "$stage/usr/lib/ocf/resource.d/baton/disk"
install -D -m 755 "$build/src/packaging/deb/prune-runtimes" "$stage/usr/lib/baton/prune-runtimes"
mkdir -p "$stage/usr/bin" "$stage/lib/systemd/system/baton-agent.service.d"
ln -s "/opt/baton/current/bin/baton" "$stage/usr/bin/baton"
for u in baton-agent.service baton-backup.service baton-backup.timer; do
  sed 's|/usr/local/bin/baton|/usr/bin/baton|g' "$build/src/packaging/systemd/$u" > "$stage/lib/systemd/system/$u"
done
cat > "$stage/lib/systemd/system/baton-agent.service.d/prune-runtimes.conf" <<'EOF'
# From the baton package: remove old runtimes under /opt/baton that no process runs any more.
[Service]
ExecStartPre=-/usr/lib/baton/prune-runtimes
EOF
share="$stage/usr/share/baton"
[ -f "$build/src/packaging/grafana/baton.json" ] && install -D -m 644 "$build/src/packaging/grafana/baton.json" "$share/grafana/baton.json"
[ -f "$build/src/packaging/prometheus/baton-rules.yml" ] && install -D -m 644 "$build/src/packaging/prometheus/baton-rules.yml" "$share/prometheus/baton-rules.yml"
doc="$stage/usr/share/doc/baton"
mkdir -p "$doc"
install -m 644 "$build/src/packaging/deb/README.Debian" "$doc/README.Debian"
for d in cli.md operations.md agent.md; do install -m 644 "$build/src/docs/$d" "$doc/$d"; done
cat > "$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: baton

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/baton/runtime/*/lib/python3.11/site-packages/*
Comment: Baton's Python dependencies, as published on PyPI; each one's licence is in its *.dist-info
 directory next to it.
EOF
printf 'baton (%s) unstable; urgency=medium\n\n  * Built from %s.\n\n -- Baton developers <baton@example.invalid>  %s\n' \
  "$version" "$commit" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")" | gzip -9n > "$doc/changelog.Debian.gz"

# ---- control, maintainer scripts, md5sums
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|g" -e "s|@ARCH@|$arch|g" -e "s|@SIZE@|$size|g" \
  "$build/src/packaging/deb/control.in" > "$stage/DEBIAN/control"
for s in postinst prerm postrm; do
  sed "s|@VERSION@|$version|g" "$build/src/packaging/deb/$s" > "$stage/DEBIAN/$s"
  chmod 755 "$stage/DEBIAN/$s"
done
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
  > "$stage/DEBIAN/md5sums"
chmod -R u+rwX,go+rX,go-w "$stage"
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0 -r touch -h -d "@$SOURCE_DATE_EPOCH"

deb="$out/baton_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1), $(dpkg-deb -c "$deb" | wc -l) entries, installed ${size} KiB)" >&2
echo "$deb"
