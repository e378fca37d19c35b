"""A CPU core's theoretical fp32 peak, read from the machine: 2 FLOPs per FMA x fp32 FMA lanes per
cycle x the clock the core actually runs at.

* **Vector width** from the CPU flags (``avx512f``: 16 fp32 lanes, ``avx2``/``fma``: 8).
* **FMA units** from the microarchitecture (vendor, family, model in ``/proc/cpuinfo``; Intel's and
  AMD's optimisation manuals), since no register reports them; confirmed by a measurement: an
  FMA-only kernel (12 independent chains of ``vfmadd`` on the widest vectors, enough to cover the
  FMA latency on two units) gives FMAs per cycle directly.
* **Clock** by timing a chain of dependent ``imul`` instructions (3 cycles each on every x86-64
  core since the Pentium Pro): under a hypervisor ``/proc/cpuinfo``'s ``cpu MHz`` is the nominal
  clock, not the turbo the core runs at (a 2-vCPU Xeon here reports 2.3 GHz and runs at 2.9).

The two probes are small C functions compiled with the system's C compiler and loaded with
``ctypes``; without a compiler, or off x86-64, the clock falls back to cpufreq / ``/proc/cpuinfo``
and the FMA kernel is not run (the result says so).
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

#: Intel family-6 models of Xeon Scalable cores with two 512-bit FMA units per core (Skylake-SP /
#: Cascade Lake / Cooper Lake, Ice Lake-SP, Sapphire / Emerald / Granite Rapids); Intel's client
#: cores with AVX-512 have one (ports 0+1 fused)
INTEL_TWO_FMA512_MODELS = frozenset({85, 106, 108, 143, 173, 174, 207})

IMUL_LATENCY_CYCLES = 3
_PROBES_C = r"""
#include <stdint.h>
#include <immintrin.h>
uint64_t imul_chain(uint64_t n) {
  uint64_t x = 3, y = 1;
  for (uint64_t i = 0; i < n; i++) __asm__ volatile(".rept 100\n\timul %1, %0\n\t.endr" : "+r"(x) : "r"(y));
  return x;
}
#if defined(WIDTH)
float fma_chains(uint64_t n) {
  VEC m = SET1(0.999999f), c = SET1(1e-7f);
  VEC a0 = SET1(0), a1 = SET1(1), a2 = SET1(2), a3 = SET1(3), a4 = SET1(4), a5 = SET1(5),
      a6 = SET1(6), a7 = SET1(7), a8 = SET1(8), a9 = SET1(9), a10 = SET1(10), a11 = SET1(11);
#define F(a) a = FMA(a, m, c);
  for (uint64_t i = 0; i < n; i++) { F(a0) F(a1) F(a2) F(a3) F(a4) F(a5) F(a6) F(a7) F(a8) F(a9) F(a10) F(a11) }
  VEC s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
  s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));
  float out[WIDTH / 32]; STORE(out, s);
  float t = 0; for (int k = 0; k < WIDTH / 32; k++) t += out[k];
  return t;
}
#endif
"""
_ISA = {512: ("-mavx512f", "__m512", "_mm512_set1_ps", "_mm512_fmadd_ps", "_mm512_add_ps", "_mm512_storeu_ps"),
        256: ("-mavx2 -mfma", "__m256", "_mm256_set1_ps", "_mm256_fmadd_ps", "_mm256_add_ps", "_mm256_storeu_ps")}
FMA_CHAINS = 12


def cpu_info() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def vector_bits(flags: Sequence[str]) -> int:
    """The widest fp32 FMA vectors the flags allow (512, 256 or 128 bits)."""
    return 512 if "avx512f" in flags else 256 if "fma" in flags or "avx2" in flags else 128


def fma_units(vendor: str, family: int, model: int, flags: Sequence[str]) -> tuple[Optional[int], str]:
    """FMA units per core at :func:`vector_bits` width, and the source; ``None`` when the
    microarchitecture is not known (the FMA kernel's measurement then decides)."""
    bits = vector_bits(flags)
    if vendor == "GenuineIntel" and family == 6:
        if bits == 512:
            if model in INTEL_TWO_FMA512_MODELS:
                return 2, f"Intel family 6 model {model}: Xeon Scalable core, 2 x 512-bit FMA units"
            return 1, f"Intel family 6 model {model}: AVX-512 client core, 1 x 512-bit FMA unit"
        if bits == 256:
            return 2, f"Intel family 6 model {model}: 2 x 256-bit FMA units"
    if vendor == "AuthenticAMD":
        if family == 0x1A:
            return (2, "AMD family 1Ah (Zen 5): 2 x 512-bit FMA units") if bits == 512 else (
                4, "AMD family 1Ah (Zen 5): 4 x 256-bit FMA issue")
        if family == 0x19:
            return (1, "AMD family 19h (Zen 4): 2 x 256-bit FMA units = 1 x 512-bit per cycle") if bits == 512 else (
                2, "AMD family 19h (Zen 3/4): 2 x 256-bit FMA units")
        if family == 0x17 and bits == 256:
            return (2, "AMD family 17h (Zen 2): 2 x 256-bit FMA units") if model >= 0x30 else (
                1, "AMD family 17h (Zen 1): 2 x 128-bit FMA units = 1 x 256-bit per cycle")
    return None, f"{vendor or 'unknown vendor'} family {family} model {model}: not in the table"


def _compile(workdir: str, bits: Optional[int]) -> Optional[ctypes.CDLL]:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    src, lib = os.path.join(workdir, "probes.c"), os.path.join(workdir, "probes.so")
    with open(src, "w") as f:
        f.write(_PROBES_C)
    args = [compiler, "-O2", "-shared", "-fPIC", "-o", lib, src]
    if bits in _ISA:
        flags, vec, set1, fma, add, store = _ISA[bits]
        args[1:1] = [*flags.split(), f"-DWIDTH={bits}", f"-DVEC={vec}", f"-DSET1={set1}", f"-DFMA={fma}",
                     f"-DADD={add}", f"-DSTORE={store}"]
    if subprocess.run(args, capture_output=True).returncode != 0:
        return None
    return ctypes.CDLL(lib)


def _best_rate(fn: Any, n: int, work: float, repeats: int = 5) -> float:
    """The best of ``repeats`` rates ``work / seconds`` of ``fn(n)``."""
    fn.argtypes = [ctypes.c_uint64]
    fn(n // 10)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return work / best


def reported_clock_ghz() -> tuple[Optional[float], str]:
    """The clock the kernel reports: cpufreq's maximum, else ``/proc/cpuinfo``'s ``cpu MHz``."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return round(int(f.read()) / 1e6, 3), "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    mhz = cpu_info().get("cpu MHz")
    return (round(float(mhz) / 1000, 3), "/proc/cpuinfo cpu MHz") if mhz else (None, "no clock reported")


def fma_peak() -> dict[str, Any]:
    """A core's theoretical fp32 peak (GFLOP/s) with each factor and its source, plus the FMA
    kernel's measured rate (see the module doc). Runs on the calling thread (~2 s)."""
    info = cpu_info()
    flags = info.get("flags", "").split()
    bits = vector_bits(flags)
    units, units_from = fma_units(info.get("vendor_id", ""), int(info.get("cpu family", 0) or 0),
                                  int(info.get("model", 0) or 0), flags)
    reported, reported_from = reported_clock_ghz()
    ghz, clock_from, kernel = reported, reported_from, None
    with tempfile.TemporaryDirectory(prefix="must-ray-cpu-peak-") as tmp:
        lib = _compile(tmp, bits if bits in _ISA else None)
        if lib is not None:
            lib.imul_chain.restype = ctypes.c_uint64
            ghz = round(_best_rate(lib.imul_chain, 2_000_000, 2e8 * IMUL_LATENCY_CYCLES) / 1e9, 3)
            clock_from = f"timed chain of dependent imul ({IMUL_LATENCY_CYCLES} cycles each)"
            if hasattr(lib, "fma_chains"):
                lib.fma_chains.restype = ctypes.c_float
                n = 20_000_000
                kernel = round(_best_rate(lib.fma_chains, n, 2.0 * n * FMA_CHAINS * bits // 32) / 1e9, 1)
    lanes = bits // 32
    measured_units = round(kernel / (2 * lanes * ghz), 2) if kernel and ghz else None
    if units is None and measured_units:
        units, units_from = max(1, round(measured_units)), f"{units_from}; from the FMA kernel's rate"
    peak = round(2 * lanes * units * ghz, 1) if units and ghz else None
    return {"vector_bits": bits, "fp32_lanes": lanes, "fma_units": units, "fma_units_from": units_from,
            "clock_ghz": ghz, "clock_from": clock_from, "reported_clock_ghz": reported,
            "reported_clock_from": reported_from, "gflops_per_core": peak, "fma_kernel_gflops": kernel,
            "fma_kernel_units_per_cycle": measured_units}


__all__ = ["fma_peak", "fma_units", "vector_bits", "reported_clock_ghz", "cpu_info", "INTEL_TWO_FMA512_MODELS"]
