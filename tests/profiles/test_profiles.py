"""Device profiles: every TOML file loads and validates; broken files fail naming file and field;
match() maps detected names; the host profile is measured once and cached."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import profiles
from edgekit.errors import EdgekitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ISSUE_DEVICES = ["a100-40gb", "a100-80gb", "h100-sxm", "h200", "l4", "t4", "jetson-agx-thor", "jetson-agx-orin-64gb",
                 "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb", "jetson-orin-nano-8gb",
                 "jetson-orin-nano-4gb", "jetson-agx-xavier", "jetson-xavier-nx", "jetson-nano"]
FILES = sorted(profiles.DIR.glob("*.toml"))
NUMERIC = ["memory_gib", "reserved_gib", "bandwidth_gbs", "fp32_tflops", "fp16_tflops", "int8_tops", "fp8_tflops",
           "bandwidth_measured_gbs", "fp16_tflops_measured", "sms", "dla"]


def test_every_device_of_the_issue_has_a_file():
    assert sorted(ISSUE_DEVICES) == sorted(p.stem for p in FILES)
    assert "host" in profiles.names()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_profile_file_loads_validates_and_cites_every_number(path):
    raw = tomllib.loads(path.read_text())
    p = profiles.load_file(path)
    assert p.name == path.stem and p.path == str(path)
    assert isinstance(raw.get("sources"), list) and raw["sources"], "sources = [...] is required"
    assert isinstance(raw.get("derived"), list), "derived = [...] is required"
    cited = {f for s in raw["sources"] for f in s["fields"]}
    for key in NUMERIC + ["sm", "stacks", "power_modes"]:
        if key in raw:
            assert key in cited, f"{path.name}: {key} has no source"
    assert set(raw["derived"]) <= set(raw)
    assert 0 <= p.reserved_gib < p.memory_gib and p.bandwidth_gbs > 0 and p.fp32_tflops > 0
    assert p.precisions and all(profiles.why_unsupported(p, x) is None for x in p.precisions)
    assert p.stacks and p.tensorrt_versions, "every GPU/Jetson profile says which TensorRT applies"


def test_load_is_the_same_as_the_file_and_unknown_names_suggest_the_nearest():
    assert profiles.load("jetson-nano") == profiles.load_file(profiles.DIR / "jetson-nano.toml")
    with pytest.raises(EdgekitError) as e:
        profiles.load("a100-40")
    assert "unknown device 'a100-40'" in str(e.value) and "did you mean 'a100-40gb'" in str(e.value)


def test_capabilities_follow_the_hardware():
    nano, a100, h100, l4, t4 = (profiles.load(n) for n in ("jetson-nano", "a100-40gb", "h100-sxm", "l4", "t4"))
    assert nano.precisions == ["fp32", "fp16"] and nano.tensorrt_versions == ["8.2.1"]
    assert "tensor cores" in profiles.why_unsupported(nano, "int8")
    assert "sm_89" in profiles.why_unsupported(a100, "fp8")
    assert "fp8" in h100.precisions and "fp8" in l4.precisions
    assert "sm_80" in profiles.why_unsupported(t4, "bf16")
    xavier = profiles.load("jetson-agx-xavier")
    assert "TensorRT 8.5.2" in profiles.why_unsupported(xavier, "int4")
    orin = profiles.load("jetson-agx-orin-64gb")
    assert orin.bandwidth() == (152.8, True) and orin.throughput("fp16") == (33.0, True)
    assert orin.throughput("int8") == (85.0, False)


# broken files ---------------------------------------------------------------------------------
GOOD = (profiles.DIR / "t4.toml").read_text()


def broken(tmp_path: Path, text: str, stem: str = "t4") -> str:
    path = tmp_path / f"{stem}.toml"
    path.write_text(text)
    with pytest.raises(EdgekitError) as e:
        profiles.load_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_broken_profiles_fail_naming_the_file_and_field(tmp_path):
    (tmp_path / "t4.toml").write_text(GOOD)
    assert profiles.load_file(tmp_path / "t4.toml").memory_gib == 16.0  # the unbroken copy loads
    cases = {
        "bandwidth_gbs": GOOD.replace("bandwidth_gbs = 320.0\n", ""),  # missing
        "memory_gib": GOOD.replace("memory_gib = 16.0", 'memory_gib = "sixteen"'),  # wrong type
        "bandwith_gbs": GOOD + "bandwith_gbs = 1.0\n",  # a typo is an unknown field
        "fp16_tflops": GOOD.replace('"fp16_tflops", ', ""),  # a number without a source
        "reserved_gib": GOOD.replace("reserved_gib = 1.75", "reserved_gib = 99.0"),
        "precisions": GOOD.replace('"fp16", "int8"]', '"fp16", "fp8", "int8"]'),  # Turing has no FP8
        "derived": GOOD.replace('derived = ["reserved_gib"]', 'derived = ["clock_mhz"]'),
        "sm": GOOD.replace('sm = "7.5"', 'sm = "sm_75"'),
        "detect": GOOD.replace(r"'\bt4\b'", "'(t4'"),
    }
    for field, text in cases.items():
        msg = broken(tmp_path, text)
        assert f"'{field}'" in msg, (field, msg)
    assert "fp8" in broken(tmp_path, cases["precisions"]) and "sm_89" in broken(tmp_path, cases["precisions"])
    assert "'name'" in broken(tmp_path, GOOD, stem="t4-copy")  # name must match the file
    assert "not valid TOML" in broken(tmp_path, GOOD.replace("memory_gib = 16.0", "memory_gib = = 16"))


# match ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,memory,expected", [
    ("NVIDIA A100-SXM4-40GB", None, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", None, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", None, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100", None, None),  # which one? not a guess
    ("NVIDIA H100 80GB HBM3", None, "h100-sxm"),
    ("NVIDIA H100 PCIe", None, None),  # different bandwidth: no profile yet
    ("NVIDIA L4", None, "l4"),
    ("Tesla T4", 14.7, "t4"),
    ("NVIDIA Jetson AGX Orin Developer Kit", None, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 30.6, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin", 62.8, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7.5, "jetson-orin-nx-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15.3, "jetson-orin-nx-16gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 7.4, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", None, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 3.5, "jetson-orin-nano-4gb"),
    ("Orin", 7.4, None),  # torch's name: Orin NX 8GB or Orin Nano 8GB? ambiguous
    ("Orin", 61.0, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson Nano Developer Kit", 3.9, "jetson-nano"),
    ("NVIDIA Tegra X1", None, "jetson-nano"),
    ("Jetson-AGX", None, "jetson-agx-xavier"),
    ("NVIDIA Jetson Xavier NX Developer Kit", None, "jetson-xavier-nx"),
    ("NVIDIA Jetson AGX Thor Developer Kit", None, "jetson-agx-thor"),
    ("NVIDIA GeForce RTX 4090", 24.0, None),
])
def test_match(name, memory, expected):
    assert profiles.match(name, memory) == expected


# host -----------------------------------------------------------------------------------------
def test_host_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    from profiles import host

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_measure(cores):
        calls.append(cores)
        return {"bandwidth_gbs": 12.5, "fp32_tflops": 0.25, "measured_at": "now", "seconds": 0.0, "method": "fake"}

    monkeypatch.setattr(host, "measure", fake_measure)
    p = profiles.load("host")
    assert calls == [host._cores()] and host.cache_path() == tmp_path / "edgekit" / "host.json"
    cached = json.loads(host.cache_path().read_text())
    assert list(cached) == [f"{host.cpu_model()} | {host._cores()} cores"]
    assert p.kind == "cpu" and p.precisions == ["fp32", "int8"] and p.cores == host._cores()
    assert p.bandwidth() == (12.5, True) and p.throughput("fp32") == (0.25, True)
    assert 0 < p.reserved_gib < p.memory_gib and p.memory_gib > 0.5
    host_profile_again = host.host_profile()
    assert len(calls) == 1 and host_profile_again.bandwidth_gbs == 12.5  # from the cache
    host.host_profile(refresh=True)
    assert len(calls) == 2


def test_host_measurements_are_real_numbers():
    from profiles import host

    assert host.measure_bandwidth_gbs(threads=2, mib=8, runs=1) > 0.1
    assert host.measure_matmul_tflops(n=128, runs=1) > 1e-5
    assert re.search(r"\S", host.cpu_model())
