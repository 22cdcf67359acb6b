"""Power telemetry: the tegrastats parser on recorded lines (tests/data/tegrastats, sources in each file),
INA3221 hwmon reading, energy integration, and the meters (NVML only where a GPU reports power)."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest

from edgekit import telemetry

DATA = Path(__file__).resolve().parents[1] / "data" / "tegrastats"


def recorded_cases():
    """(file, line, expectations) for every recorded line; expectations come from the `# expect:` comment above it."""
    cases = []
    for path in sorted(DATA.glob("*.txt")):
        expect: dict = {}
        for raw in path.read_text().splitlines():
            if raw.startswith("# expect:"):
                expect = dict(kv.split("=", 1) for kv in raw[len("# expect:"):].split())
            elif raw and not raw.startswith("#"):
                cases.append(pytest.param(raw, expect, id=f"{path.stem}-{len(cases)}"))
                expect = {}
    return cases


CASES = recorded_cases()


def test_every_format_is_recorded():
    names = {p.stem for p in DATA.glob("*.txt")}
    assert {"nano_jp4", "jetpack4_tx2_tx1_agx_xavier", "agx_orin_jp5_6", "agx_orin_jp7"} <= names
    assert len(CASES) >= 12
    for path in DATA.glob("*.txt"):
        assert "source:" in path.read_text(), f"{path.name} must say where its lines come from"


@pytest.mark.parametrize("line,expect", CASES)
def test_tegrastats_recorded_lines(line, expect):
    parsed = telemetry.parse_tegrastats(line)
    assert expect, "every recorded line carries its expected values"
    assert parsed["total_mw"] == pytest.approx(float(expect["total_mw"]))
    if expect["total_from"] == "sum":
        assert parsed["total_from"].startswith("sum of ")
        assert parsed["total_mw"] == pytest.approx(sum(parsed["rails"].values()))
    else:
        assert parsed["total_from"] == expect["total_from"]
    if "rails" in expect:
        assert list(parsed["rails"]) == expect["rails"].split(",")
    if "ram_total_mb" in expect:
        assert parsed["ram_total_mb"] == int(expect["ram_total_mb"])
    if "gpu_load_pct" in expect:
        assert parsed["gpu_load_pct"] == int(expect["gpu_load_pct"])
    # memory, swap, temperatures and clocks are never mistaken for power rails
    assert not {"RAM", "SWAP", "IRAM", "EMC_FREQ", "GR3D_FREQ", "APE"} & set(parsed["rails"])
    assert all(v >= 0 for v in parsed["rails"].values())


def test_tegrastats_average_and_jp7_max_columns():
    nano = telemetry.parse_tegrastats(next(c.values[0] for c in CASES if c.id.startswith("nano_jp4")))
    assert nano["rails"]["POM_5V_CPU"] == 1078 and nano["rails_avg"]["POM_5V_CPU"] == 1205
    jp7 = next(c.values[0] for c in CASES if c.id.startswith("agx_orin_jp7"))
    parsed = telemetry.parse_tegrastats(jp7)
    assert parsed["rails"] == {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500}


def test_tegrastats_line_without_rails():
    parsed = telemetry.parse_tegrastats("RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ 10%@1300 APE 150")
    assert parsed["rails"] == {} and parsed["total_mw"] is None and parsed["gpu_load_pct"] == 10


def test_integrate():
    # constant 5 W sampled every 0.5 s over [0, 2] s: 10 J; the ends are held to the nearest sample
    samples = [(t, 5.0) for t in (0.25, 0.75, 1.25, 1.75)]
    r = telemetry.integrate(samples, 0.0, 2.0, "test")
    assert r["joules"] == pytest.approx(10.0) and r["mean_power_w"] == pytest.approx(5.0)
    ramp = telemetry.integrate([(0.0, 0.0), (1.0, 2.0)], 0.0, 1.0, "test")
    assert ramp["joules"] == pytest.approx(1.0)
    assert telemetry.integrate([], 0.0, 1.0, "test") is None


def _hwmon(root: Path) -> Path:
    """An INA3221 in the kernel's hwmon layout (mV / mA); labels as in the Orin NX/Nano device tree."""
    hw = root / "sys/class/hwmon/hwmon1"
    hw.mkdir(parents=True)
    (root / "sys/class/hwmon/hwmon0").mkdir()
    (root / "sys/class/hwmon/hwmon0/name").write_text("cpu_thermal\n")
    files = {"name": "ina3221", "in1_label": "VDD_IN", "in1_input": "5000", "curr1_input": "1200",
             "in2_label": "VDD_CPU_GPU_CV", "in2_input": "5000", "curr2_input": "200",
             "in3_label": "VDD_SOC", "in3_input": "5000", "curr3_input": "300",
             "in4_label": "NC", "in4_input": "0", "curr4_input": "0",
             "in7_label": "sum of shunt voltages", "in7_input": "123"}
    for name, text in files.items():
        (hw / name).write_text(text + "\n")
    return hw


def test_ina3221_hwmon(tmp_path):
    _hwmon(tmp_path)
    channels = telemetry.ina3221_channels(tmp_path)
    assert set(channels) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    mw = telemetry.read_ina3221(channels)
    assert mw == {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 1000.0, "VDD_SOC": 1500.0}
    assert telemetry.board_total(mw) == (6000.0, "VDD_IN")


def test_ina3221_jetpack4_iio(tmp_path):
    dev = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    dev.mkdir(parents=True)
    for k, (name, mw) in enumerate((("POM_5V_IN", 3210), ("POM_5V_GPU", 0), ("POM_5V_CPU", 1078))):
        (dev / f"rail_name_{k}").write_text(name + "\n")
        (dev / f"in_power{k}_input").write_text(f"{mw}\n")
    mw = telemetry.read_ina3221(telemetry.ina3221_channels(tmp_path))
    assert telemetry.board_total(mw) == (3210.0, "POM_5V_IN")


def test_ina3221_meter_energy(tmp_path):
    _hwmon(tmp_path)
    jetson = {"jetson": {"model": "NVIDIA Jetson Orin NX"}, "cuda": None}
    meter, why = telemetry.power_meter(jetson, root=tmp_path)
    assert isinstance(meter, telemetry.Ina3221Meter), why
    import time

    meter.start()
    time.sleep(0.2)
    r = meter.stop()
    assert r["mean_power_w"] == pytest.approx(6.0)
    assert r["joules"] == pytest.approx(6.0 * r["seconds"], rel=1e-6) and r["samples"] >= 2
    assert r["rails"] == "VDD_IN"


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX shell for the fake tegrastats")
def test_tegrastats_meter_reads_a_running_tegrastats(tmp_path):
    """The meter runs `tegrastats --interval MS` and integrates each line's board total: here a stand-in
    script that prints the recorded AGX Orin JetPack 7 line."""
    line = next(c.values[0] for c in CASES if c.id.startswith("agx_orin_jp7"))
    exe = tmp_path / "tegrastats"
    exe.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.02; done\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    import time

    meter = telemetry.TegrastatsMeter(str(exe), interval_ms=20).start()
    time.sleep(0.5)
    r = meter.stop()
    assert r is not None and r["source"] == "tegrastats"
    assert r["mean_power_w"] == pytest.approx(13.907, rel=1e-3)
    assert r["rails"].startswith("sum of VDD_GPU_SOC")


def test_no_power_sensor_is_reported_not_invented():
    meter, why = telemetry.power_meter({"jetson": None, "cuda": None}, root="/nonexistent")
    assert meter is None and "energy is not estimated" in why
    meter, why = telemetry.power_meter({"jetson": {"model": "x"}, "cuda": None}, root="/nonexistent")
    if shutil.which("tegrastats") is None:
        assert meter is None and "no power reading" in why


def test_nvml_meter_on_a_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: NVML power cannot be read")
    pytest.importorskip("pynvml", reason="pynvml is not installed (pip install 'edgekit[gpu]')")
    meter, why = telemetry.power_meter({"jetson": None, "cuda": {"name": "gpu"}, "runs_on_gpu": True})
    if meter is None:
        pytest.skip(f"this GPU reports no power: {why}")
    import time

    meter.start()
    time.sleep(0.2)
    r = meter.stop()
    assert r["joules"] >= 0 and r["seconds"] > 0
