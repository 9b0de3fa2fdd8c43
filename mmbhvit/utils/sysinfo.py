# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""What a timing was measured on: the CPU model and its SIMD level, printed
by every benchmark next to its numbers."""
import os
import platform
from typing import Dict, Optional

#: (cpuinfo flag, name) from the widest SIMD level down; aarch64 last.
_LEVELS = (('avx512f', 'AVX-512'), ('avx2', 'AVX2'), ('avx', 'AVX'),
           ('sse4_2', 'SSE4.2'), ('sve', 'SVE'), ('asimd', 'NEON'))
#: AVX-512 extensions worth naming (popcount, VNNI, BF16).
_AVX512_EXTRAS = ('avx512bw', 'avx512vl', 'avx512_vpopcntdq',
                  'avx512_bitalg', 'avx512_vnni', 'avx512_bf16')


#: the preload library of tools/deployment/as_avx2_cpu.py
AVX2_VIEW_LIBRARY = 'libmmbhvit_avx2_cpu.so'


def cpuid_view() -> Optional[str]:
    """``'avx2'`` when this process runs under
    ``tools/deployment/as_avx2_cpu.py`` (its library is loaded and says it
    masks CPUID), else None."""
    if os.environ.get('MMBHVIT_CPUID_VIEW') != 'avx2':
        return None
    try:
        with open('/proc/self/maps') as f:
            loaded = any(AVX2_VIEW_LIBRARY in line for line in f)
    except OSError:
        return None
    return 'avx2' if loaded else None


def cpu_info() -> Dict[str, object]:
    """``model`` (``/proc/cpuinfo``'s model name), ``simd`` (the widest
    level, with the AVX-512 extensions present) and ``logical_cpus``."""
    model, flags = None, set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and model is None:
                    model = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = next((name for flag, name in _LEVELS if flag in flags), 'unknown')
    if simd == 'AVX-512' and cpuid_view() == 'avx2':
        # /proc/cpuinfo lists the hardware; the programs see less
        simd = 'AVX2 (CPUID view of an AVX-512 CPU)'
    elif simd == 'AVX-512':
        extras = [f for f in _AVX512_EXTRAS if f in flags]
        simd += f' ({", ".join(extras)})' if extras else ''
    return dict(model=model or platform.processor() or platform.machine(),
                simd=simd, logical_cpus=os.cpu_count())


def cpu_description() -> str:
    """One line: model, logical CPUs, SIMD level."""
    info = cpu_info()
    return (f"{info['model']}, {info['logical_cpus']} logical CPUs, "
            f"SIMD {info['simd']}")
