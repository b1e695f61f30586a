"""The in-namespace half of femd's task network: a helper process, run by femd.

Run once per agent as ``python -I -S nsjoin.py CONTROL_FD``: a single-threaded
zygote. For each task femd sends it, on the ``SOCK_SEQPACKET`` socket
*CONTROL_FD*, a ``join`` message carrying two descriptors (SCM_RIGHTS): the
task's network namespace and the task's own control socket. The zygote forks
a child (cheap, and safe: the zygote has one thread) that joins the namespace
(first its owning user namespace when it lacks the right to join directly, as
an unprivileged femd does), says ``ready`` (or why not) and serves requests on
the task's control socket, one per message, each answered with ``ok`` and a
socket passed back, or ``error: ...``:

- ``listen ADDRESS PORT``: a TCP listener bound there (egress: the task
  connects to it; femd accepts and forwards outside);
- ``connect PORT``: a connection to the task's listener on loopback (ingress);
- ``address ADDRESS``: add an IPv4 address to ``lo`` (an egress destination
  given as an IP literal).

Sockets keep the namespace they were created in, so femd uses them from
outside. The helper lives outside the sandbox's PID namespace (the task cannot
see, signal or replace it) and exits when femd closes the control socket; the
zygote exits when femd does.
Standard library only: it is not imported by femd, only run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h
RTM_NEWADDR, NLMSG_ERROR = 20, 2
NLM_F_REQUEST_ACK_EXCL_CREATE = 0x1 | 0x4 | 0x200 | 0x400
IFA_ADDRESS, IFA_LOCAL, RT_SCOPE_HOST = 1, 2, 254

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, kind: int) -> None:
    if _libc.setns(fd, kind) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def join(netns_fd: int) -> None:
    """Enter the network namespace; through its user namespace if need be."""
    try:
        _setns(netns_fd, CLONE_NEWNET)
    except PermissionError:
        # Unprivileged: the namespace's owner has every capability in it.
        userns_fd = fcntl.ioctl(netns_fd, NS_GET_USERNS)
        _setns(userns_fd, CLONE_NEWUSER)
        os.close(userns_fd)
        _setns(netns_fd, CLONE_NEWNET)


def add_address(address: str) -> None:
    """``ip addr add ADDRESS/32 dev lo`` over rtnetlink."""
    index = socket.if_nametoindex("lo")
    packed = socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, RT_SCOPE_HOST, index)
    for kind in (IFA_LOCAL, IFA_ADDRESS):
        body += struct.pack("=HH", 8, kind) + packed
    header = struct.pack(
        "=IHHII", 16 + len(body), RTM_NEWADDR, NLM_F_REQUEST_ACK_EXCL_CREATE, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.send(header + body)
        reply = s.recv(4096)
    kind = struct.unpack_from("=H", reply, 4)[0]
    code = -struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0
    if code not in (0, errno.EEXIST):
        raise OSError(code, os.strerror(code))


def listen(address: str, port: int) -> socket.socket:
    """A listener on *address*:*port*; waits for ``lo`` to come up (bwrap)."""
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((address, port))
            s.listen(128)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            time.sleep(0.05)
        else:
            return s
    raise OSError(errno.EADDRNOTAVAIL, f"{address} never came up")


def connect(port: int) -> socket.socket:
    """A connection to the task's listener on 127.0.0.1 (else ::1)."""
    error: OSError | None = None
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
        except OSError as e:
            s.close()
            error = e
        else:
            s.settimeout(None)
            return s
    raise error or OSError(errno.ECONNREFUSED, "refused")


def serve(control: socket.socket) -> None:
    """Answer requests until femd closes *control*."""
    while request := control.recv(256):
        words = request.decode("ascii", "replace").split()
        try:
            if words[0] == "listen" and len(words) == 3:
                made = listen(words[1], int(words[2]))
            elif words[0] == "connect" and len(words) == 2:
                made = connect(int(words[1]))
            elif words[0] == "address" and len(words) == 2:
                add_address(words[1])
                control.send(b"ok")
                continue
            else:
                control.send(b"error: bad request")
                continue
        except (OSError, ValueError) as e:
            control.send(f"error: {e}".encode()[:200])
            continue
        with made:
            socket.send_fds(control, [b"ok"], [made.fileno()])


def child(control: socket.socket, netns_fd: int) -> int:
    """Join the namespace, say ``ready`` (or why not), then serve."""
    try:
        join(netns_fd)
    except OSError as e:
        control.send(f"error: cannot join the network namespace: {e}".encode())
        return 1
    finally:
        os.close(netns_fd)
    control.send(b"ready")
    serve(control)
    return 0


def zygote(control: socket.socket) -> None:
    """Fork one child per ``join`` request, until femd closes *control*."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while True:
        msg, fds, _, _ = socket.recv_fds(control, 16, 2)
        if not msg:
            return
        if msg != b"join" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        netns_fd, task_fd = fds
        if os.fork() == 0:
            control.close()
            code = 1
            try:
                code = child(socket.socket(fileno=task_fd), netns_fd)
            finally:
                os._exit(code)
        os.close(netns_fd)
        os.close(task_fd)


def main() -> int:
    """Serve as the zygote on the control socket given as argument."""
    zygote(socket.socket(fileno=int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
