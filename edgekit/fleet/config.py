"""fleet.toml: the devices of a fleet, by name.

    known_hosts = "~/.ssh/known_hosts"      # optional (this default); host keys are checked against it

    [defaults]                              # optional: any device field, for every device
    user = "nvidia"
    key = "~/.ssh/id_ed25519"
    edgekit = "/opt/edgekit/.venv/bin/edgekit"
    workdir = "/tmp/edgekit-fleet"

    [devices.orin-nano]
    host = "192.168.1.20"
    profile = "jetson-orin-nano-8gb"        # the profiles/*.toml this device should be

Every mistake is a one-line EdgekitError naming the file, the device and the field.
"""

from __future__ import annotations

import getpass
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgekit.errors import EdgekitError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_WORKDIR = "/tmp/edgekit-fleet"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a device name is also a file name in the report


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        raise EdgekitError("no user name for SSH: this machine does not say who you are",
                           "set user = \"NAME\" in fleet.toml ([defaults] or the device)") from None


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    port: int = 22
    user: str = field(default_factory=lambda: _login())
    key: str | None = None  # private key file; None: asyncssh's defaults (~/.ssh/id_*, the agent)
    edgekit: str = "edgekit"  # the remote command, split like a shell would (a venv path, "python -m edgekit.cli")
    workdir: str = DEFAULT_WORKDIR  # the only remote directory fleet writes to
    profile: str | None = None  # expected profiles/*.toml name ('host' for a plain CPU machine)
    timeout: float = 1800.0  # seconds for one device's whole run (upload, verify, install, profile)
    connect_timeout: float = 20.0

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def edgekit_argv(self) -> list[str]:
        return shlex.split(self.edgekit)


@dataclass(frozen=True)
class Fleet:
    path: Path
    devices: list[Device]
    known_hosts: Path

    def select(self, names: list[str] | None) -> list[Device]:
        """The devices called `names` (all when None or empty), in the file's order."""
        if not names:
            return list(self.devices)
        known = {d.name: d for d in self.devices}
        for n in names:
            if n not in known:
                raise unknown_name("device", n, known)
        return [d for d in self.devices if d.name in names]


FIELDS = {f.name: f for f in fields(Device) if f.name != "name"}
TYPES = {"host": str, "port": int, "user": str, "key": str, "edgekit": str, "workdir": str, "profile": str,
         "timeout": (int, float), "connect_timeout": (int, float)}


def _check_field(where: str, key: str, value):
    if key not in FIELDS:
        near = unknown_name("field", key, FIELDS)
        raise EdgekitError(f"{where}: {near.message}", near.fix)
    want = TYPES[key]
    if isinstance(value, bool) or not isinstance(value, want):
        kind = "a number" if want == (int, float) else f"a {want.__name__}"
        raise EdgekitError(f"{where}: {key} must be {kind}, not {value!r}", "fix the value in the file")
    if key in ("port",) and not 0 < value < 65536:
        raise EdgekitError(f"{where}: port {value} is out of range", "use 1-65535")
    if key in ("timeout", "connect_timeout") and value <= 0:
        raise EdgekitError(f"{where}: {key} must be positive", "give seconds, e.g. 1800")
    if key == "workdir":
        norm = posixpath.normpath(value)
        if not value.startswith("/") or norm in ("/", "/tmp", "/home", "/root", "/var", "/usr", "/etc") or \
                ".." in value.split("/"):
            raise EdgekitError(f"{where}: workdir {value!r} must be an absolute path of its own, such as "
                               f"{DEFAULT_WORKDIR}", "fleet writes and cleans only there: give it a dedicated "
                               "directory")
        return norm
    if key == "edgekit":
        try:
            if not shlex.split(value):
                raise ValueError("empty")
        except ValueError as e:
            raise EdgekitError(f"{where}: edgekit command {value!r} cannot be split ({e})",
                               "give the remote command, e.g. '/opt/venv/bin/edgekit'") from None
    if key == "profile":
        import profiles

        if value not in profiles.names():
            near = unknown_name("device profile", value, profiles.names())
            raise EdgekitError(f"{where}: {near.message}", near.fix)
    if key == "key":
        return str(Path(value).expanduser())
    return float(value) if key in ("timeout", "connect_timeout") else value


def load(path: str | Path) -> Fleet:
    """Read and check fleet.toml."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"{path} does not exist", "write a fleet.toml (README: 'Profiling a fleet')")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EdgekitError(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{path}: not valid TOML ({e})", "fix the syntax") from None
    extra = sorted(set(data) - {"known_hosts", "defaults", "devices"})
    if extra:
        raise EdgekitError(f"{path}: unknown top-level key {extra[0]!r}", "known: known_hosts, [defaults], "
                           "[devices.NAME]")
    defaults = data.get("defaults", {})
    devices = data.get("devices", {})
    if not isinstance(defaults, dict) or not isinstance(devices, dict):
        raise EdgekitError(f"{path}: defaults and devices must be tables", "write [defaults] and [devices.NAME]")
    if not devices:
        raise EdgekitError(f"{path} lists no devices", "add a [devices.NAME] table with at least host = ...")
    base = {k: _check_field(f"{path} [defaults]", k, v) for k, v in defaults.items()}
    out = []
    for name, table in devices.items():
        where = f"{path} [devices.{name}]"
        if not NAME.match(name):
            raise EdgekitError(f"{where}: the device name must be letters, digits, '.', '_' or '-'",
                               "rename the table")
        if not isinstance(table, dict):
            raise EdgekitError(f"{where} is not a table", f"write [devices.{name}] with host = ...")
        values = {**base, **{k: _check_field(where, k, v) for k, v in table.items()}}
        if values.get("key") and not Path(values["key"]).is_absolute():
            values["key"] = str(path.parent / values["key"])  # relative to the fleet file
        if "host" not in values:
            raise EdgekitError(f"{where} has no host", "add host = \"ADDRESS\"")
        if values.get("key") and not Path(values["key"]).is_file():
            raise EdgekitError(f"{where}: key file {values['key']} does not exist",
                               "give the private key that logs in to the device")
        out.append(Device(name=name, **values))
    known = data.get("known_hosts", "~/.ssh/known_hosts")
    if not isinstance(known, str):
        raise EdgekitError(f"{path}: known_hosts must be a path", "e.g. known_hosts = \"~/.ssh/known_hosts\"")
    known_path = Path(known).expanduser()
    if not known_path.is_absolute():
        known_path = path.parent / known_path  # relative to the fleet file, like its other paths
    return Fleet(path, out, known_path)
