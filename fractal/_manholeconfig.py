# -*- test-case-name: tests.test_manhole -*-
"""
The Manhole's configuration checks, kept apart from the SSH server so that
checking C{twistd fractal}'s options does not load C{twisted.conch} (whose
user authentication module imports the global reactor).  The public names are
re-exported by L{fractal.manhole}.
"""

from __future__ import annotations

import ipaddress
import os

from twisted.python.filepath import FilePath

__all__ = [
    "HOST_KEY_NAME",
    "ManholeConfigurationError",
    "checkEndpoint",
    "checkKeysFile",
    "checkHostKeyFile",
]

HOST_KEY_NAME = "manhole_host_key"
"""
The name of the host key file in a node's data directory.
"""


class ManholeConfigurationError(ValueError):
    """
    The Manhole is configured in a way it refuses to run: an endpoint that is
    reachable from other machines without the allow-remote flag, a missing or
    loosely protected key file, an unreadable host key.  The message says
    what to change.
    """


# ---------------------------------------------------------------------------
# Configuration checks: the endpoint, the key files.


def _splitDescription(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a server or client endpoint description into its positional and
    keyword arguments, following the grammar of L{serverFromString} and
    L{clientFromString} (C{:} separates arguments, C{=} separates a keyword
    from its value, C{\\} escapes either).  The first positional argument
    is the endpoint type.  L{fractal.certs} reads peer descriptions with it
    too.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current: list[str] = []
    key: str | None = None
    escaped = False

    def flush() -> None:
        if key is None:
            args.append("".join(current))
        else:
            kwargs[key] = "".join(current)

    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            flush()
            current, key = [], None
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    flush()
    return args, kwargs


def _isLoopback(interface: str) -> bool:
    """
    Whether C{interface} names a loopback address: C{localhost}, an address
    in 127.0.0.0/8 or C{::1}.  Other host names are not resolved and count
    as remote.
    """
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def checkEndpoint(description: str, allowRemote: bool = False) -> None:
    """
    Refuse a Manhole endpoint that other machines could reach, unless remote
    access is explicitly allowed.

    C{tcp}, C{tcp6} and C{ssl} endpoints must name a loopback C{interface}
    (their default, every interface, is remote); C{unix} sockets are local.
    Any other endpoint type counts as remote, since its reach cannot be told
    from its description.

    @param description: a server endpoint description, as given to
        L{twisted.internet.endpoints.serverFromString}.
    @param allowRemote: whether the operator allowed remote access.
    @raise ManholeConfigurationError: if the endpoint is, or may be, remote
        and C{allowRemote} is false, or if the description is empty.
    """
    args, kwargs = _splitDescription(description)
    kind = args[0].lower() if args else ""
    if not kind:
        raise ManholeConfigurationError("the manhole endpoint description is empty")
    if allowRemote or kind == "unix":
        return
    if kind in ("tcp", "tcp6", "ssl"):
        interface = kwargs.get("interface", "")
        if kind == "tcp" and "interface" not in kwargs and len(args) > 2:
            interface = args[2]
        if _isLoopback(interface):
            return
        why = (
            f"interface {interface!r} is not a loopback address"
            if interface
            else "no interface is given, so it listens on every interface"
        )
    else:
        why = f"a {kind!r} endpoint may be reachable from other machines"
    raise ManholeConfigurationError(
        f"refusing to open the manhole on {description!r}: {why}.  Bind a "
        "loopback interface (for example 'tcp:2222:interface=127.0.0.1') "
        "or pass --manhole-allow-remote."
    )


def checkKeysFile(path: FilePath[str]) -> None:
    """
    Refuse an C{authorized_keys} file that does not exist or that other users
    could change (whoever can write it can log in).

    @param path: the file.
    @raise ManholeConfigurationError: saying what is wrong and how to fix it.
    """
    what = "authorized keys file"
    try:
        mode = os.stat(path.path).st_mode
    except OSError as e:
        raise ManholeConfigurationError(
            f"the manhole {what} {path.path!r} cannot be read: {e.strerror}"
        ) from None
    if mode & 0o022:
        raise ManholeConfigurationError(
            f"the manhole {what} {path.path!r} is writable by other users "
            f"(mode {mode & 0o777:04o}); anyone who can write it can log in.  "
            f"Run: chmod go-w {path.path}"
        )



def checkHostKeyFile(path: FilePath[str]) -> None:
    """
    Refuse an existing host key file that other users may read or write (a
    missing one is fine: it is generated at start).

    @param path: the private host key file.
    @raise ManholeConfigurationError: saying how to fix it.
    """
    try:
        mode = os.stat(path.path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ManholeConfigurationError(
            f"the manhole host key {path.path!r} cannot be read: {e.strerror}"
        ) from None
    if mode & 0o077:
        raise ManholeConfigurationError(
            f"the manhole host key {path.path!r} is accessible by other "
            f"users (mode {mode & 0o777:04o}); run: chmod 600 {path.path}"
        )
