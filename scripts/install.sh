#!/bin/sh
# Idempotent set-up of everything femd's demo and tests need, on a fresh
# Debian 12 where you are root and only python3 and git exist:
#   - Debian packages (RabbitMQ, rootless Podman with runc, uidmap and
#     catatonit, bubblewrap, systemd-nspawn, debootstrap, busybox-static for
#     test images and podman's output step, lintian for the package test,
#     TLS roots for pip, Slurm with munge, slurmdbd and MariaDB for the slurm
#     launcher's test cluster),
#   - the unprivileged users tasks run as (femd-task for bubblewrap,
#     femd-podman for rootless Podman with its subuid/subgid ranges),
#   - a virtualenv in .venv with femd installed (editable) and its test tools,
#   - the read-only task runtimes in /opt/femd/runtimes (runtimes/*/requirements.txt:
#     pinned, hash-checked wheels; tasks get them mounted, never download).
# Safe to run again: it only adds what is missing.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "install: run as root (it installs Debian packages and creates users)" >&2
    exit 2
fi

# Installed without Recommends, so everything a step needs is listed here: e.g.
# catatonit (the container init podman runs with --init) is only recommended
# by podman, and ca-certificates only by git and python3-pip.
pkgs="python3-venv python3-dev gcc ca-certificates git rabbitmq-server \
podman runc uidmap catatonit bubblewrap \
systemd-container debootstrap busybox-static iproute2 procps util-linux \
lintian python3-seccomp slurm-wlm slurm-client slurmdbd munge \
mariadb-server-core mariadb-client-core"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install: apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The distribution's RabbitMQ node, munged, Slurm daemons and MariaDB are
    # not used: tests and the demo start their own private ones (own ports,
    # keys, state). Keep the packages' services from starting.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

# The user bubblewrap tasks run as when femd itself runs as root.
if ! getent passwd femd-task >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "femd sandboxed tasks" femd-task
fi
sh scripts/setup-podman-user.sh >/dev/null

[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
# Re-run every time: cheap when satisfied, and picks up dependency changes.
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# An editable install compiles nothing; a package install (pip, the .deb's
# postinst) compiles every module. Do as they do, so the agent run from this
# tree starts like an installed one (where PYTHONDONTWRITEBYTECODE is set,
# every start would otherwise compile femd from source: ~60 ms, ~1.3 MB).
.venv/bin/python -m compileall -q femd
# libseccomp's Python binding is a Debian package, not on PyPI: the venv sees
# that one module (not all of dist-packages), so a test can check femd's
# syscall tables against libseccomp's.
seccomp_so=$(ls /usr/lib/python3/dist-packages/seccomp.cpython-*.so 2>/dev/null | head -n 1)
if [ -n "$seccomp_so" ]; then
    mkdir -p .venv/debian-seccomp
    ln -sf "$seccomp_so" .venv/debian-seccomp/
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$(pwd)/.venv/debian-seccomp" > "$site/debian-seccomp.pth"
fi
# Task runtimes: one virtualenv per runtimes/NAME/requirements.txt, rebuilt only
# when that file changes (its sha256 is kept beside the venv).
for req in runtimes/*/requirements.txt; do
    [ -f "$req" ] || continue
    name=$(basename "$(dirname "$req")")
    dest=/opt/femd/runtimes/$name
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ "$(cat "$dest/.femd-requirements.sha256" 2>/dev/null)" != "$want" ]; then
        echo "install: runtime $name -> $dest"
        rm -rf "$dest"
        mkdir -p /opt/femd/runtimes
        /usr/bin/python3 -m venv "$dest"
        "$dest/bin/pip" install -q --disable-pip-version-check --no-deps \
            --require-hashes --only-binary=:all: -r "$req"
        echo "$want" > "$dest/.femd-requirements.sha256"
        chmod -R go-w,a+rX "$dest"
    fi
done
echo "install: ok"
