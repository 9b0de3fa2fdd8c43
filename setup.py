# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
import os
import os.path as osp
import re
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version():
    """Read ``__version__`` from mmbhvit/__init__.py without importing it."""
    with open(osp.join(HERE, 'mmbhvit', '__init__.py'), encoding='utf-8') as f:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(),
                          re.MULTILINE)
    if match is None:
        raise RuntimeError('__version__ not found in mmbhvit/__init__.py')
    return match.group(1)


def read_readme():
    path = osp.join(HERE, 'README.md')
    if not osp.isfile(path):
        return ''
    with open(path, encoding='utf-8') as f:
        return f.read()


# Ranges, not pins: users bring their own (CUDA) torch and their own mmcv.
# mmcv is deliberately not listed: either full mmcv (>=2.0.0rc4, <2.2.0, as
# mmsegmentation 1.2 requires) or mmcv-lite 2.1.0 works, and pip cannot
# express "one of the two". The exact pins CI uses are in requirements/.
INSTALL_REQUIRES = [
    'torch>=2.0',
    'torchvision',
    'mmengine>=0.10.0,<1.0.0',
    'mmsegmentation>=1.2.2,<1.3.0',
    'mmpretrain>=1.2.0,<1.3.0',
    'numpy',
    # imported by mmsegmentation at import time, but not declared by it
    'ftfy',
    'regex',
]


def binary_ops_extension():
    """The packed-bit CPU kernels of mmbhvit.deploy (``mmbhvit._binary_ops``).

    Optional: without torch at build time, without a C++ compiler, or with
    ``MMBHVIT_NO_EXT=1``, mmbhvit installs without it and the engine uses its
    pure-PyTorch fallback. Install with ``--no-build-isolation`` so that the
    build sees the environment's torch.
    """
    if os.environ.get('MMBHVIT_NO_EXT', '0') == '1':
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch is not importable while building
        print(f'mmbhvit: not building the packed-bit kernels ({e})')
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed build of the optional kernels is a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no / broken compiler, missing headers
                print(f'mmbhvit: WARNING: building mmbhvit._binary_ops failed '
                      f'({type(e).__name__}: {e}); mmbhvit.deploy will use '
                      'its pure-PyTorch fallback')

    csrc = 'csrc'
    if sys.platform == 'win32':
        flags, link = ['/O2', '/openmp', '/fp:precise'], []
    else:
        # -ffp-contract=off: one rounding per float operation, as in the
        # PyTorch fallback; ISA-specific code is selected at run time.
        flags = ['-O3', '-g0', '-fopenmp', '-ffp-contract=off',
                 '-fno-trapping-math']
        link = ['-fopenmp']
    ext = CppExtension(
        'mmbhvit._binary_ops',
        sources=[
            osp.join(csrc, f) for f in ('binary_ops.cpp', 'kernels_avx512.cpp',
                                        'kernels_avx2.cpp',
                                        'kernels_generic.cpp')
        ],
        include_dirs=[osp.join(HERE, csrc)],
        extra_compile_args=flags,
        extra_link_args=link)
    return [ext], {'build_ext': OptionalBuildExtension}


EXT_MODULES, CMDCLASS = binary_ops_extension()

setup(
    name='mmbhvit',
    version=read_version(),
    description='BHViT, the Binarized Hybrid Vision Transformer, for '
    'mmpretrain and mmsegmentation',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    author='mmbhvit contributors',
    license='Apache License 2.0',
    packages=find_packages(
        exclude=('tests', 'tests.*', 'configs', 'configs.*', 'tools',
                 'tools.*', 'docs', 'docs.*')),
    python_requires='>=3.8',
    install_requires=INSTALL_REQUIRES,
    extras_require={'tests': ['pytest']},
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)
