"""edgekit: put the V3 and R1 model families on real hardware."""

__version__ = "0.1.0"
