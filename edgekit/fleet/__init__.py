"""`edgekit fleet`: one bundle profiled on many devices over SSH, one merged report.

    fleet.toml      the devices by name (config)
    check           reach each device: host key, login, remote edgekit version, identity vs its profile (check)
    profile         copy (only when the sha256 differs), verify, install and profile the bundle on every
                    device in parallel; fetch each report; clean the remote work directory (run)
    report          one table and a PNG over a fleet run's directory, with plan's estimate beside each
                    measurement where the device's profile is known (report)

SSH is asyncssh (ssh): every session is one asyncio task, at most --parallel at once. The workstation side
never imports torch; plan's estimate runs in a child process (report).
"""

from edgekit.fleet.check import check, check_async
from edgekit.fleet.config import Device, Fleet, load
from edgekit.fleet.report import report
from edgekit.fleet.run import ProfileOptions, profile, profile_async

__all__ = ["Device", "Fleet", "ProfileOptions", "check", "check_async", "load", "profile", "profile_async", "report"]
