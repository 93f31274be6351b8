"""Which bf16 instructions the CPU has, read from /proc/cpuinfo: no torch here, so the benchmark's
parent process (which must not load torch) asks the same question `--precision auto` asks."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 (AMX, AVX-512) and aarch64 ("Features")
NO_BF16 = "no bf16 hardware (no avx512_bf16, amx_bf16 or bf16 in /proc/cpuinfo)"  # why bf16 is not used


def first_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The fields of the first CPU in /proc/cpuinfo (its first block), name -> value; empty where
    there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _flags(cpu: dict[str, str]) -> list[str]:
    """Its flag list ("flags" on x86, "Features" on aarch64)."""
    return (cpu.get("flags") or cpu.get("Features") or "").split()


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 flags of the first CPU in /proc/cpuinfo."""
    have = set(_flags(first_cpu(cpuinfo)))
    return [f for f in BF16_FLAGS if f in have]


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """What identifies this kind of CPU for a measured choice kept across restarts: vendor, model
    name, family, model, stepping and a hash of the full flag list (the same name has shipped with
    other flags), from the first CPU in /proc/cpuinfo; empty where there is none."""
    import hashlib

    cpu = first_cpu(cpuinfo)
    if not cpu:
        return {}
    names = {"vendor_id": "vendor", "model name": "model_name", "cpu family": "family", "model": "model",
             "stepping": "stepping", "CPU implementer": "vendor", "CPU part": "model"}
    out = {names[k]: v for k, v in cpu.items() if k in names}
    out["flags_sha256"] = hashlib.sha256(" ".join(sorted(_flags(cpu))).encode()).hexdigest()[:16]
    return out
