#!/bin/sh
# Idempotent host set-up for femd's rootless Podman back-end (CI, demo, production).
#
# What it does (run as root; safe to run again):
#   1. creates the system user/group `femd-podman` (home /var/lib/femd-podman,
#      no login shell) that owns the rootless Podman storage and API socket;
#   2. gives it FEMD_PODMAN_SUBIDS (default 9 x 65536) subordinate uids and gids in
#      /etc/subuid and /etc/subgid (a free range above every existing one; an
#      existing smaller allocation is topped up): `userns=auto` gives each
#      container its own 65536 ids, so this bounds concurrent containers (8);
#   3. writes its ~/.config/containers/{containers,storage}.conf:
#      runtime=runc (crun fails on hybrid cgroup v1 hosts), cgroup_manager=cgroupfs
#      (no systemd user session), events_logger=file (no journald needed),
#      log_driver=k8s-file (logs readable after exit), no default network; the
#      storage's graphroot in its home. No runroot: podman keeps it in
#      $XDG_RUNTIME_DIR/containers, which is /run/user/<uid> here (testbed, CI)
#      and /run/femd-podman under femd-podman.service (ProtectSystem=strict
#      leaves only that part of /run writable);
#   4. creates its runtime dir (XDG_RUNTIME_DIR) /run/user/<uid>, mode 0700,
#      as logind would; not when FEMD_PODMAN_RUNTIME_DIR is set to "" (the
#      package does that: femd-podman.service brings its own, /run/femd-podman);
#   5. creates the socket directory (default /run/femd/podman, mode 0750, group
#      $FEMD_GROUP when that group exists) so the agent can reach the socket;
#   6. with FEMD_SIGNATURE_POLICY=<containers-policy.json>, installs it as the
#      user's ~/.config/containers/policy.json: the libpod pull API takes no policy
#      path, so this is how a launcher profile's `signature_policy` is enforced
#      (the podman launcher refuses to pull unless both files are identical).
#
# Environment: FEMD_PODMAN_USER (femd-podman), FEMD_PODMAN_HOME
# (/var/lib/femd-podman), FEMD_GROUP (femd), FEMD_PODMAN_SOCKET_DIR (/run/femd/podman),
# FEMD_PODMAN_SUBIDS (589824), FEMD_PODMAN_RUNTIME_DIR (/run/user/<uid>; "" for
# none), FEMD_SIGNATURE_POLICY (unset).
#
# The femd package's postinst runs this script (installed as
# /usr/share/femd/setup-podman-user.sh) with FEMD_PODMAN_RUNTIME_DIR="".
#
# Starting the service itself is the unit's job (or testbed/podman.py in tests):
#   XDG_RUNTIME_DIR=/run/user/<uid> podman system service --time=0 \
#       unix:///run/femd/podman/podman.sock
# Podman creates that socket mode 0600, so for the agent (group femd) to connect,
# production uses socket activation: a femd-podman.socket unit with
# ListenStream=/run/femd/podman/podman.sock, SocketUser=femd-podman,
# SocketGroup=femd, SocketMode=0660, and femd-podman.service (User=femd-podman)
# running `podman system service --time=0` (it takes the socket from systemd).
# Whoever can connect to the socket controls femd-podman's containers.
set -eu

user=${FEMD_PODMAN_USER:-femd-podman}
home=${FEMD_PODMAN_HOME:-/var/lib/femd-podman}
agent_group=${FEMD_GROUP:-femd}
socket_dir=${FEMD_PODMAN_SOCKET_DIR:-/run/femd/podman}
want=${FEMD_PODMAN_SUBIDS:-589824}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-podman-user: must run as root" >&2
    exit 2
fi
for tool in podman runc newuidmap newgidmap; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "setup-podman-user: $tool is missing (apt-get install podman runc uidmap)" >&2
        exit 2
    }
done

# 1. the user
if ! getent group "$user" >/dev/null; then
    groupadd --system "$user"
fi
if ! getent passwd "$user" >/dev/null; then
    useradd --system --gid "$user" --home-dir "$home" --create-home \
        --shell /usr/sbin/nologin --comment "femd rootless podman" "$user"
fi
uid=$(id -u "$user")
gid=$(id -g "$user")
# Home and config are traversable (the agent reads policy.json), not listable;
# the container storage below stays private (podman makes it 0700).
install -d -o "$uid" -g "$gid" -m 0711 "$home"

# 2. subordinate ids: first free start above every range already given out
next_start() {
    awk -F: 'BEGIN { top = 100000 }
             NF == 3 { end = $2 + $3; if (end > top) top = end }
             END { print top }' "$1" 2>/dev/null || echo 100000
}
have_ids() {
    awk -F: -v u="$user" -v id="$uid" '($1 == u || $1 == id) && NF == 3 { n += $3 }
                                       END { print n + 0 }' "$1"
}
changed=no
for kind in uid gid; do
    file=/etc/sub$kind
    touch "$file"
    have=$(have_ids "$file")
    if [ "$have" -lt "$want" ]; then
        start=$(next_start "$file")
        end=$((start + want - have - 1))
        usermod "--add-sub${kind}s" "$start-$end" "$user"
        changed=yes
    fi
done

# 3. podman configuration for that user
conf="$home/.config/containers"
install -d -o "$uid" -g "$gid" -m 0711 "$home/.config"
install -d -o "$uid" -g "$gid" -m 0755 "$conf"
tmp=$(mktemp)
cat >"$tmp" <<'EOF'
# Written by femd scripts/setup-podman-user.sh; edits are overwritten.
[containers]
log_driver = "k8s-file"
netns = "none"
pids_limit = 0

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
install -o "$uid" -g "$gid" -m 0644 "$tmp" "$conf/containers.conf"
cat >"$tmp" <<EOF
# Written by femd scripts/setup-podman-user.sh; edits are overwritten.
[storage]
driver = "overlay"
graphroot = "$home/.local/share/containers/storage"
EOF
install -o "$uid" -g "$gid" -m 0644 "$tmp" "$conf/storage.conf"
rm -f "$tmp"

# 4. runtime dir (what pam_systemd/logind would create)
runtime_dir=${FEMD_PODMAN_RUNTIME_DIR-/run/user/$uid}
if [ -n "$runtime_dir" ]; then
    [ -d "$(dirname "$runtime_dir")" ] || install -d -m 0755 "$(dirname "$runtime_dir")"
    install -d -o "$uid" -g "$gid" -m 0700 "$runtime_dir"
fi

# new subordinate ids reach podman only once its pause process is restarted
# (under femd-podman.service: once the service restarts)
if [ "$changed" = yes ] && [ -n "$runtime_dir" ]; then
    runuser -u "$user" -- env HOME="$home" XDG_RUNTIME_DIR="$runtime_dir" \
        sh -c 'cd / && podman system migrate' >/dev/null 2>&1 ||
        echo "setup-podman-user: warning: podman system migrate failed" >&2
fi

# 5. socket directory: the agent's group may enter it, nobody else. Its parent
# is left as it is when it exists (/run/femd: femd.service's RuntimeDirectory=).
[ -d "$(dirname "$socket_dir")" ] || install -d -m 0755 "$(dirname "$socket_dir")"
if getent group "$agent_group" >/dev/null; then
    install -d -o "$uid" -g "$agent_group" -m 0750 "$socket_dir"
else
    install -d -o "$uid" -g "$gid" -m 0750 "$socket_dir"
fi

# 6. signature policy for pulls
if [ -n "${FEMD_SIGNATURE_POLICY:-}" ]; then
    install -o "$uid" -g "$gid" -m 0644 "$FEMD_SIGNATURE_POLICY" "$conf/policy.json"
fi

echo "femd-podman: user $user uid=$uid subuids=$(have_ids /etc/subuid) subgids=$(have_ids /etc/subgid)"
