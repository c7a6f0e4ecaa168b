"""Shared by the benchmark scripts: a description of the machine a figure was measured on."""

import platform


def cpu_name() -> str:
  """The CPU model name (from /proc/cpuinfo on Linux), e.g. "AMD EPYC 9R14 96-Core Processor"."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
