"""One SSH session to one device (asyncssh): host-key policy, remote commands that stop when the session
ends, and the SFTP operations fleet needs — nothing else.

Host keys: every connection is checked against known_hosts. A host with no entry is refused unless
accept_new, in which case its key is fetched, appended to known_hosts, and the connection is then checked
against that recorded key (trust on first use, like OpenSSH's StrictHostKeyChecking=accept-new). A key
that differs from a recorded one is always refused.

Remote commands run under a small POSIX sh wrapper (WATCH): the command runs in the background while a
watcher reads the session's stdin; when the session ends for any reason — fleet cancelled (Ctrl-C), a
timeout, a dropped connection — sshd closes that stdin, the watcher sees end of file and sends the command
SIGTERM (SIGKILL 10 s later). So no remote profile outlives its session, whatever the server's support for
SSH signal requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fleet.config import Device

WATCH = ('exec 3<&0\n'
         '"$@" 3<&- </dev/null &\n'
         'p=$!\n'
         '{ cat <&3 >/dev/null 2>&1; kill -TERM $p 2>/dev/null; sleep 10; kill -KILL $p 2>/dev/null; } '
         '>/dev/null 2>&1 &\n'
         'w=$!\n'
         'exec 3<&-\n'
         'wait $p\n'
         'r=$?\n'
         'kill $w 2>/dev/null\n'
         'exit $r\n')
MAX_FETCH = 64 << 20  # a profile report is tens of KiB; refuse to read anything absurd into memory
STOP_GRACE = 15.0  # seconds to wait for a cancelled remote command to exit before cleaning up


class Dropped(Exception):
    """The connection went away mid-run (network, reboot, sshd restart): worth one retry."""


def asyncssh_module():
    try:
        import asyncssh
    except ImportError:
        raise EdgekitError("edgekit fleet needs asyncssh", "pip install 'asyncssh>=2.14'") from None
    return asyncssh


def known_hosts_name(device: Device) -> str:
    return device.host if device.port == 22 else f"[{device.host}]:{device.port}"


def is_dropped(e: BaseException) -> bool:
    asyncssh = asyncssh_module()
    if isinstance(e, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
        return False
    return isinstance(e, Dropped | asyncssh.ConnectionLost | asyncssh.DisconnectError | asyncssh.SFTPConnectionLost
                      | ConnectionResetError | BrokenPipeError | asyncssh.ChannelOpenError)


def _known(path: Path, device: Device) -> bool:
    """Has known_hosts any key for this host (and port)?"""
    asyncssh = asyncssh_module()
    if not path.is_file():
        return False
    try:
        match = asyncssh.read_known_hosts(str(path)).match(device.host, device.host, device.port)
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot read known_hosts {path}: {e}", "fix or move the file") from None
    return any(match[:3])


async def trust(device: Device, known_hosts: Path, accept_new: bool, lock: asyncio.Lock) -> str:
    """'known' or 'recorded' (a new key written to known_hosts); refuses an unknown host otherwise."""
    asyncssh = asyncssh_module()
    async with lock:  # several devices may record keys at once: one writer at a time
        if _known(known_hosts, device):
            return "known"
        name = known_hosts_name(device)
        if not accept_new:
            raise EdgekitError(f"{device.name}: {name} is not in {known_hosts}: its host key is unknown, refused",
                               f"check the key and add it (ssh-keyscan -p {device.port} {device.host} >> "
                               f"{known_hosts}), or pass --accept-new-host-keys to record it on first contact")
        try:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(device.host, device.port, config=None),
                                         device.connect_timeout)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise _connect_error(device, e) from None
        if key is None:
            raise EdgekitError(f"{device.name}: {name} sent no host key", "is it an SSH server?")
        algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
        line = f"{name} {algorithm} {blob}\n"
        try:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(known_hosts, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            raise EdgekitError(f"cannot record the host key in {known_hosts}: {e.strerror or e}",
                               "make the file writable or choose another known_hosts in fleet.toml") from None
        return "recorded"


def _connect_error(device: Device, e: BaseException) -> Exception:
    asyncssh = asyncssh_module()
    where = f"{device.name} ({device.address})"
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return EdgekitError(f"{where}: the host key does not match the one recorded in known_hosts — refused "
                            "(a reinstalled device, or someone in between)",
                            f"if the device was reinstalled, remove its old key: ssh-keygen -R "
                            f"'{known_hosts_name(device)}' -f KNOWN_HOSTS, then check the new one")
    if isinstance(e, asyncssh.PermissionDenied):
        return EdgekitError(f"{where}: login refused", "check user and key in fleet.toml, and the device's "
                            "authorized_keys")
    if isinstance(e, asyncio.TimeoutError):
        return EdgekitError(f"{where}: no answer within {device.connect_timeout:g} s", "is the device on and "
                            "reachable? raise connect_timeout in fleet.toml for slow links")
    if is_dropped(e):
        return Dropped(f"{where}: connection lost ({e})")
    if isinstance(e, OSError):
        return EdgekitError(f"{where}: cannot connect ({e.strerror or e})", "is sshd running there, and the "
                            "host and port right?")
    return EdgekitError(f"{where}: SSH failed ({type(e).__name__}: {e})")


@dataclass
class Completed:
    rc: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        lines = [ln for ln in (self.stderr or self.stdout).strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self.rc}"


class Session:
    """A connection with its SFTP channel; `async with Session.open(...) as s`."""

    def __init__(self, device: Device, conn, sftp):
        self.device, self.conn, self.sftp = device, conn, sftp

    @classmethod
    async def open(cls, device: Device, known_hosts: Path, accept_new: bool, lock: asyncio.Lock) -> Session:
        asyncssh = asyncssh_module()
        await trust(device, known_hosts, accept_new, lock)
        try:
            conn = await asyncssh.connect(
                device.host, device.port, username=device.user, known_hosts=str(known_hosts),
                client_keys=[device.key] if device.key else (), connect_timeout=device.connect_timeout,
                keepalive_interval=15, keepalive_count_max=4, config=None)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise _connect_error(device, e) from None
        try:
            sftp = await conn.start_sftp_client()
        except BaseException as e:
            conn.abort()
            if isinstance(e, Exception):
                raise _connect_error(device, e) from None
            raise
        return cls(device, conn, sftp)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self.sftp.exit()
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 5)

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        words = (["env", *(f"{k}={v}" for k, v in env.items())] if env else []) + argv
        return f"sh -c {shlex.quote(WATCH)} edgekit-fleet " + " ".join(shlex.quote(w) for w in words)

    async def run(self, argv: list[str], env: dict[str, str] | None = None) -> Completed:
        """Run argv on the device; a cancelled run stops the remote command (WATCH) before returning."""
        try:
            proc = await self.conn.create_process(self.command(argv, env), encoding="utf-8", errors="replace")
        except Exception as e:
            raise Dropped(f"{self.device.name}: {e}") if is_dropped(e) else e from None
        try:
            done = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                proc.stdin.write_eof()  # the watcher sees end of file and stops the command
                await asyncio.wait_for(proc.wait_closed(), STOP_GRACE)
            proc.close()
            raise
        except Exception as e:
            raise Dropped(f"{self.device.name}: {e}") if is_dropped(e) else e from None
        if done.exit_status is None or done.exit_status < 0:
            raise Dropped(f"{self.device.name}: the connection ended while '{argv[0]}' ran")
        return Completed(done.exit_status, done.stdout or "", done.stderr or "")

    async def sftp_call(self, what: str, coro):
        asyncssh = asyncssh_module()
        try:
            return await coro
        except asyncssh.SFTPError as e:
            if is_dropped(e):
                raise Dropped(f"{self.device.name}: {e}") from None
            raise EdgekitError(f"{self.device.name}: {what} failed ({e.reason})",
                               "check the workdir in fleet.toml: the login user must be able to write it") from None
        except Exception as e:
            if is_dropped(e):
                raise Dropped(f"{self.device.name}: {e}") from None
            raise

    async def read_file(self, path: str) -> bytes:
        async def read() -> bytes:
            async with self.sftp.open(path, "rb") as f:
                size = (await f.stat()).size or 0
                if size > MAX_FETCH:
                    raise EdgekitError(f"{self.device.name}: {path} is {size} bytes, too large for a report")
                return await f.read()

        return await self.sftp_call(f"reading {path}", read())
