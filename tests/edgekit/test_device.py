"""Device identification on recorded /proc, device-tree and sysfs contents (tests/data/device, sources
in its README), with commands answered from recordings; CUDA only where a GPU is present."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgekit import device

DATA = Path(__file__).resolve().parents[1] / "data" / "device"
ORIN = DATA / "jetson-agx-orin"


def recorded_commands(argv: list[str]) -> str | None:
    """`nvpmodel -q` as recorded; `jetson_clocks --show` needs root, so like an unprivileged run: nothing."""
    if argv[:2] == ["nvpmodel", "-q"]:
        return (ORIN / "nvpmodel-q.txt").read_text()
    return None


def test_jetson_agx_orin():
    info = device.identify(ORIN, run=recorded_commands)
    assert info["cpu"] == {"model": "Cortex-A78AE", "logical_cores": 12}
    assert info["memory_gib"] == pytest.approx(29.12, abs=0.01)
    j = info["jetson"]
    assert j["model"] == "NVIDIA Jetson AGX Orin Developer Kit"  # NUL terminator stripped
    assert j["l4t"] == "36.4.3"
    assert j["nvpmodel"] == {"mode": "MAXN", "id": 0}
    assert j["jetson_clocks"] == "on" and "min == max" in j["jetson_clocks_from"]
    assert info["cuda"] is None  # not probed for a recorded tree
    # the 32 GB module, by memory (29 GiB visible): the matching profile, not the 64 GB one
    assert info["profile"] == "jetson-agx-orin-32gb"


def test_jetson_clocks_off_when_a_core_scales(tmp_path):
    root = tmp_path / "orin"
    shutil.copytree(ORIN, root)
    (root / "sys/devices/system/cpu/cpu3/cpufreq/scaling_min_freq").write_text("115200\n")
    info = device.identify(root, run=recorded_commands)
    assert info["jetson"]["jetson_clocks"] == "off"


def test_jetson_without_tools_or_sysfs(tmp_path):
    root = tmp_path / "bare"
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Nano Developer Kit\x00")
    info = device.identify(root, run=lambda argv: None)
    assert info["jetson"]["nvpmodel"] is None and info["jetson"]["jetson_clocks"] == "unknown"
    assert info["profile"] == "jetson-nano"


def test_jetson_clocks_show_recorded():
    text = (DATA / "jetson_clocks-show-tx1.txt").read_text()
    assert device.parse_jetson_clocks_show(text) == "on"
    assert device.parse_jetson_clocks_show(text.replace("cpu2: Gonvernor=interactive MinFreq=1734000",
                                                        "cpu2: Gonvernor=interactive MinFreq=102000")) == "off"
    assert device.parse_jetson_clocks_show("") is None


def test_nvpmodel_parse():
    assert device.parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2\n") == {"mode": "MAXN_SUPER", "id": 2}
    assert device.parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: 15W\n1\n") == {"mode": "15W", "id": 1}
    assert device.parse_nvpmodel(None) is None


def test_x86_host_recorded():
    info = device.identify(DATA / "x86-host", run=lambda argv: None)
    assert info["cpu"]["model"].startswith("Intel(R) Xeon(R)") and info["cpu"]["logical_cores"] >= 1
    assert info["jetson"] is None and info["cuda"] is None
    assert info["profile"] == "host"


def test_arm_cpu_names():
    assert device.ARM_PARTS[(0x41, 0xD42)] == "Cortex-A78AE"
    assert device.ARM_PARTS[(0x41, 0xD07)] == "Cortex-A57"  # Jetson Nano / TX1 / TX2


def test_this_machine():
    info = device.identify()
    assert info["cpu"]["model"] and info["cpu"]["logical_cores"] >= 1
    assert info["memory_gib"] > 0
    assert "torch" in info["versions"] and "onnxruntime" in info["versions"]
    assert info["profile"] is not None


def test_cuda_device_identified():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    info = device.identify()
    c = info["cuda"]
    assert c["name"] == torch.cuda.get_device_name() and c["sm"].count(".") == 1 and c["memory_gib"] > 0


def test_host_facts_read_the_same_tree_as_identify():
    """bundle install's compatibility facts come from the same readers as `identify` (one place reads the machine):
    the recorded Orin is a Jetson, its JetPack from dpkg's nvidia-jetpack version; the x86 host is not."""
    def run(argv):
        return "6.2+b77" if argv[0] == "dpkg-query" else recorded_commands(argv)

    orin = device.host_facts(need_tensorrt=True, root=ORIN, run=run)
    assert orin["jetson"] is True and orin["jetpack"] == "6.2"
    assert device.host_facts(root=ORIN, run=run).get("jetpack") is None  # only looked up when TensorRT is needed
    host = device.host_facts(need_tensorrt=True, root=DATA / "x86-host", run=run)
    assert host["jetson"] is False and "jetpack" not in host
    assert host["memory_bytes"] > 0 and host["arch"]


def test_host_facts_is_what_bundle_checks_read():
    from edgekit.bundle import compat

    assert compat.host_facts is device.host_facts
