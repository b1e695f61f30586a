#!/bin/sh
# Build femd_<version>_amd64.deb with dpkg-deb (no debhelper, no dh-virtualenv).
#
#   packaging/deb/build.sh [OUTDIR]        (default OUTDIR: dist/)
#
# What it does:
#   1. builds wheels of femd and of all its dependencies (`pip wheel`, from PyPI
#      or the configured index) with the build host's python3, which must be the
#      target's: Debian 12 ships Python 3.11 and the wheels are cp311/manylinux.
#      The package's Depends pins python3 to that minor version for this reason.
#   2. generates the manual page femd(1) from the CLI's argparse definitions
#      (packaging/deb/manpage.py) and lays out the package tree: wheels in /usr/share/femd/wheels, units,
#      sysusers.d, tmpfiles.d, journald catalog, scripts/setup-podman-user.sh
#      (run by postinst), launcher profiles, example
#      policies, docs, conffiles /etc/femd/{femd.yaml,policy.yaml}, /usr/bin/femd.
#   3. dpkg-deb --build --root-owner-group.
# postinst builds /opt/femd as a venv from the shipped wheels, offline.
#
# Environment: PYTHON (default python3), PIP_INDEX_URL etc. as pip reads them.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
outdir=${1:-$repo/dist}
python=${PYTHON:-python3}

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/femd/__init__.py")
[ -n "$version" ] || { echo "build.sh: no __version__ in femd/__init__.py" >&2; exit 2; }
pymajmin=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$python" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
for tool in dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
root=$work/root

# --- 1. wheels ---------------------------------------------------------------
# Build from a clean copy so that nothing (build/, *.egg-info) lands in the repo.
src=$work/src
mkdir -p "$src"
cp "$repo/pyproject.toml" "$src/"
for f in README.md LICENSE; do
    if [ -f "$repo/$f" ]; then cp "$repo/$f" "$src/"; fi
done
if [ ! -f "$src/README.md" ]; then
    echo "femd" > "$src/README.md"   # pyproject's readme must exist to build
fi
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - femd | tar -C "$src" -xf -

"$python" -m venv "$work/buildenv"
wheels=$root/usr/share/femd/wheels
mkdir -p "$wheels"
"$work/buildenv/bin/python" -m pip wheel --quiet --disable-pip-version-check \
    --prefer-binary --wheel-dir "$wheels" "$src"
[ -n "$(ls "$wheels"/femd-"$version"-*.whl 2>/dev/null)" ] || {
    echo "build.sh: the femd wheel was not built" >&2; exit 1; }

# femd(1), generated from the CLI's argparse definitions so it never drifts.
"$work/buildenv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-index --find-links "$wheels" femd
changelog_version=$(sed -n '1s/^femd (\([^)]*\)).*/\1/p' "$here/changelog")
[ "$changelog_version" = "$version" ] || {
    echo "build.sh: packaging/deb/changelog is for $changelog_version, femd is $version" >&2
    exit 2; }
changelog_date=$(sed -n 's/^ -- .*>  \(.*\)$/\1/p' "$here/changelog" | head -n 1)
man_date=$(date -u -d "$changelog_date" +%Y-%m-%d)

# --- 2. the package tree ------------------------------------------------------
install -d "$root/DEBIAN" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/usr/lib/tmpfiles.d" "$root/usr/lib/systemd/catalog" \
    "$root/usr/share/femd/launchers" "$root/usr/share/doc/femd/examples" \
    "$root/etc/femd" "$root/usr/bin"
install -m 0644 "$repo/units/femd.service" "$repo/units/femd-podman.service" \
    "$repo/units/femd-podman.socket" "$root/lib/systemd/system/"
install -m 0644 "$repo/units/femd.sysusers" "$root/usr/lib/sysusers.d/femd.conf"
install -m 0644 "$repo/units/femd.tmpfiles" "$root/usr/lib/tmpfiles.d/femd.conf"
install -m 0644 "$repo/units/femd.catalog" "$root/usr/lib/systemd/catalog/femd.catalog"
# postinst runs it: femd-podman's subordinate ids and Podman configuration.
install -m 0755 "$repo/scripts/setup-podman-user.sh" "$root/usr/share/femd/setup-podman-user.sh"
for f in "$repo"/launchers/*.yaml; do
    if [ -f "$f" ]; then install -m 0644 "$f" "$root/usr/share/femd/launchers/"; fi
done
if [ -d "$repo/policies" ]; then
    tar -C "$repo/policies" -cf - . | tar -C "$root/usr/share/doc/femd/examples" -xf -
fi
for f in "$repo"/docs/*.md "$repo"/docs/*.schema.json "$repo/README.md"; do
    if [ -f "$f" ]; then install -m 0644 "$f" "$root/usr/share/doc/femd/"; fi
done
install -m 0644 "$here/copyright" "$root/usr/share/doc/femd/copyright"
# A native package: the changelog is changelog.gz (gzip -n: reproducible).
gzip -9n < "$here/changelog" > "$root/usr/share/doc/femd/changelog.gz"
install -d "$root/usr/share/man/man1"
"$work/buildenv/bin/python" "$here/manpage.py" "$version" "$man_date" > "$work/femd.1"
gzip -9n < "$work/femd.1" > "$root/usr/share/man/man1/femd.1.gz"
chmod 0644 "$root/usr/share/doc/femd/changelog.gz" "$root/usr/share/man/man1/femd.1.gz"
# The repository's femd.yaml already names the /etc, /usr/share, /var/lib and
# /run paths this package uses; it is shipped as is.
install -m 0644 "$repo/femd.yaml" "$root/etc/femd/femd.yaml"
install -m 0644 "$here/policy.yaml" "$root/etc/femd/policy.yaml"
ln -s /opt/femd/bin/femd "$root/usr/bin/femd"

for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$root/DEBIAN/$script"
done
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$size/" \
    -e "s/@PYMAJMIN@/$pymajmin/" -e "s/@PYNEXT@/$pynext/" \
    "$here/control.in" > "$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
    xargs -0 md5sum | sed 's| \./| |') > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

# --- 3. the .deb --------------------------------------------------------------
mkdir -p "$outdir"
deb=$outdir/femd_${version}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
