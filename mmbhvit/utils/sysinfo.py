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


#: AMD core generations by (family, first model, last model); a hypervisor
#: often shows only "AMD EPYC", and the core decides the popcount peak.
_AMD_CORES = ((23, 0x00, 0x2f, 'Zen/Zen+'), (23, 0x30, 0xff, 'Zen 2'),
              (25, 0x00, 0x0f, 'Zen 3'), (25, 0x20, 0x5f, 'Zen 3'),
              (25, 0x10, 0x1f, 'Zen 4'), (25, 0x60, 0xaf, 'Zen 4'),
              (26, 0x00, 0xff, 'Zen 5'))


def _family_model(fields: Dict[str, str]) -> Optional[tuple]:
    try:
        return int(fields['cpu family']), int(fields['model'])
    except (KeyError, ValueError):
        return None  # e.g. aarch64


def _core(fields: Dict[str, str]) -> Optional[str]:
    """The AMD core generation, else None."""
    fm = _family_model(fields)
    if fm is None or fields.get('vendor_id') != 'AuthenticAMD':
        return None
    return next((name for fam, lo, hi, name in _AMD_CORES
                 if fam == fm[0] and lo <= fm[1] <= hi), None)


def _model_detail(fields: Dict[str, str]) -> str:
    """``' (family F, model M: core)'`` from cpuinfo's fields; empty when
    they are missing."""
    fm, core = _family_model(fields), _core(fields)
    if fm is None:
        return ''
    return f' (family {fm[0]}, model {fm[1]}' + (
        f': {core})' if core else ')')


def vector_alu_ports(info: Optional[Dict[str, object]] = None) -> int:
    """256-bit integer vector ALU ports per core: 4 on AMD Zen 2 to Zen 5,
    3 otherwise (Intel since Ice Lake; assumed for unknown cores). The AVX2
    popcount peak scales with it (tools/deployment/benchmark_binary.py)."""
    core = (info or cpu_info()).get('core')
    return 4 if core in ('Zen 2', 'Zen 3', 'Zen 4', 'Zen 5') else 3


def cpu_info(path: str = '/proc/cpuinfo') -> Dict[str, object]:
    """``model`` (``/proc/cpuinfo``'s model name with its family, model
    number and, for AMD, core generation), ``simd`` (the widest level, with
    the AVX-512 extensions present) and ``logical_cpus``."""
    fields: Dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'processor' and fields:
                    break  # the first CPU describes them all
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    flags = set(fields.get('flags', fields.get('Features', '')).split())
    model = fields.get('model name')
    if model is not None:
        model += _model_detail(fields)
    simd = next((name for flag, name in _LEVELS if flag in flags), 'unknown')
    if simd == 'AVX-512' and cpuid_view() == 'avx2':
        # /proc/cpuinfo lists the hardware; the programs see less
        simd = 'AVX2 (CPUID view of an AVX-512 CPU)'
    elif simd == 'AVX-512':
        extras = [f for f in _AVX512_EXTRAS if f in flags]
        simd += f' ({", ".join(extras)})' if extras else ''
    return dict(model=model or platform.processor() or platform.machine(),
                simd=simd, logical_cpus=os.cpu_count(), core=_core(fields))


def cpu_description() -> str:
    """One line: model, logical CPUs, SIMD level."""
    info = cpu_info()
    return (f"{info['model']}, {info['logical_cpus']} logical CPUs, "
            f"SIMD {info['simd']}")
