# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""The CPU line printed beside every timing."""
from mmbhvit.utils import sysinfo


def _cpuinfo(tmp_path, vendor, family, model, name, flags):
    cpu = (f'processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: '
           f'{family}\nmodel\t\t: {model}\nmodel name\t: {name}\n'
           f'flags\t\t: {flags}\n\n')
    path = tmp_path / 'cpuinfo'
    path.write_text(cpu.format(0) + cpu.format(1))
    return str(path)


def test_amd_core_named(tmp_path):
    path = _cpuinfo(tmp_path, 'AuthenticAMD', 25, 1, 'AMD EPYC',
                    'fpu popcnt avx avx2')
    info = sysinfo.cpu_info(path)
    assert info['model'] == 'AMD EPYC (family 25, model 1: Zen 3)'
    assert info['simd'] == 'AVX2'
    genoa = _cpuinfo(tmp_path, 'AuthenticAMD', 25, 17, 'AMD EPYC',
                     'avx2 avx512f avx512bw')
    info = sysinfo.cpu_info(genoa)
    assert info['model'].endswith('model 17: Zen 4)')
    assert info['simd'] == 'AVX-512 (avx512bw)'


def test_intel_and_missing_fields(tmp_path):
    path = _cpuinfo(tmp_path, 'GenuineIntel', 6, 167, 'Intel Xeon',
                    'avx2 avx512f')
    assert sysinfo.cpu_info(path)['model'] == (
        'Intel Xeon (family 6, model 167)')
    arm = tmp_path / 'arm'
    arm.write_text('processor\t: 0\nFeatures\t: fp asimd\n'
                   'CPU part\t: 0xd0b\n\nprocessor\t: 1\n')
    info = sysinfo.cpu_info(str(arm))
    assert info['simd'] == 'NEON' and info['model']  # platform's name
    assert sysinfo.cpu_info(str(tmp_path / 'absent'))['simd'] == 'unknown'


def test_vector_ports_set_the_avx2_popcount_peak(tmp_path):
    """4 vector ALU ports on Zen 2-5 (128 binary MACs per cycle with the
    nibble-table loop), 3 elsewhere (96)."""
    from _helpers import load_tool
    bench = load_tool('deployment/benchmark_binary.py')
    zen3 = sysinfo.cpu_info(_cpuinfo(tmp_path, 'AuthenticAMD', 25, 1,
                                     'AMD EPYC', 'avx2'))
    intel = sysinfo.cpu_info(_cpuinfo(tmp_path, 'GenuineIntel', 6, 167,
                                      'Intel Xeon', 'avx2 avx512f'))
    assert sysinfo.vector_alu_ports(zen3) == 4
    assert sysinfo.vector_alu_ports(intel) == 3
    assert bench.avx2_peak_per_cycle(4) == 128
    assert bench.avx2_peak_per_cycle(3) == 96
    assert bench.avx2_peak_per_cycle() == 32 * sysinfo.vector_alu_ports()
