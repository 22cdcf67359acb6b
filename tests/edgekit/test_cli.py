"""The root of the command line."""

from edgekit import __version__


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"edgekit {__version__}"
