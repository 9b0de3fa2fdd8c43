# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
import os
import os.path as osp
import re
import shutil
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

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


EXT_NAME = 'mmbhvit._binary_ops'
# The kernel core (csrc/core, csrc/kernels: plain C++, no torch; also built
# on its own by csrc/Makefile for its C++ test) and its torch binding.
KERNEL_SETS = ('avx512', 'avx2', 'popcnt', 'neon', 'generic')
EXT_SOURCES = [osp.join('csrc', 'binary_ops.cpp'),
               osp.join('csrc', 'training_ops.cpp'),
               osp.join('csrc', 'core', 'dispatch.cpp'),
               osp.join('csrc', 'core', 'nibble_lut.cpp'),
               osp.join('csrc', 'core', 'scratch.cpp')] + [
                   osp.join('csrc', 'kernels', f'kernels_{k}.cpp')
                   for k in KERNEL_SETS
               ]

NO_TORCH_MESSAGE = """
mmbhvit: WARNING: torch is not importable while building ({error}), so the
packed-bit C++ kernels (mmbhvit._binary_ops) are NOT built: pip's default
build isolation hides the environment's torch from the build. mmbhvit is
installed without them; mmbhvit.deploy then runs its pure-PyTorch fallback
and warns once at first use. To build them against your torch:
  pip install --no-build-isolation .      (or -e .; needs setuptools in
                                           the environment)
To install without them on purpose (no warning here): MMBHVIT_NO_EXT=1.
"""


class NoTorchBuildExtension(_build_ext):
    """Stands in for torch's BuildExtension when torch is not importable:
    the package installs without the kernels, the build log says why and how
    to build them (NO_TORCH_MESSAGE), and mmbhvit.deploy warns once at first
    use (mmbhvit/deploy/ops.py, load_extension). Metadata steps never run
    build_ext."""

    torch_error = ''

    def run(self):
        sys.stderr.write(NO_TORCH_MESSAGE.format(error=self.torch_error))

    # nothing was built, so nothing to install or to copy in place
    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


def binary_ops_extension():
    """The packed-bit CPU kernels of mmbhvit.deploy (``mmbhvit._binary_ops``).

    Built against the environment's torch: install with
    ``--no-build-isolation``. Without torch at build time (pip's default
    build isolation) the package installs without them, with a warning in
    the build log (``NO_TORCH_MESSAGE``) and one at first use of
    mmbhvit.deploy; ``MMBHVIT_NO_EXT=1`` installs without the kernels on
    purpose. A failed compilation (no or a
    broken C++ compiler) is a warning: mmbhvit.deploy then uses its
    pure-PyTorch fallback.
    """
    if os.environ.get('MMBHVIT_NO_EXT', '0') == '1':
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch is not importable while building
        NoTorchBuildExtension.torch_error = f'{type(e).__name__}: {e}'
        return [Extension(EXT_NAME, sources=EXT_SOURCES)], {
            'build_ext': NoTorchBuildExtension
        }

    class OptionalBuildExtension(BuildExtension):
        """A failed build of the optional kernels is a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no / broken compiler, missing headers
                print(f'mmbhvit: WARNING: building mmbhvit._binary_ops failed '
                      f'({type(e).__name__}: {e}); mmbhvit.deploy will use '
                      'its pure-PyTorch fallback')

    if sys.platform == 'win32':
        flags, link = ['/O2', '/openmp', '/fp:precise'], []
    else:
        # -ffp-contract=off: one rounding per float operation, as in the
        # PyTorch fallback; ISA-specific code is selected at run time.
        # -fvisibility=hidden: only the module's init function is exported,
        # so two builds loaded in one process (benchmark_binary --against)
        # each run their own kernels and keep their own kernel-set choice
        # (exported, the second build's calls bound to the first's).
        flags = ['-O3', '-g0', '-fopenmp', '-ffp-contract=off',
                 '-fno-trapping-math', '-fvisibility=hidden',
                 '-fvisibility-inlines-hidden']
        link = ['-fopenmp']
    ext = CppExtension(
        EXT_NAME,
        sources=EXT_SOURCES,
        include_dirs=[osp.join(HERE, 'csrc')],
        extra_compile_args=flags,
        extra_link_args=link)
    return [ext], {'build_ext': OptionalBuildExtension}


# --------------------------------------------------------------------------
# Package data for OpenMMLab's mim (`mim train/test/search mmbhvit`): mim
# looks for <package>/.mim/{tools,configs,model-index.yml}. As in mmseg and
# mmpretrain: in an editable install mmbhvit/.mim holds relative symlinks to
# the repository's folders (copies on Windows); a normal build (pip install .,
# wheel, from an sdist) copies them into the build, never into the source.
# --------------------------------------------------------------------------
MIM_FILES = ('configs', 'tools', 'model-index.yml')
MIM_IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '*.pyo')


def _remove(path):
    if osp.islink(path) or osp.isfile(path):
        os.remove(path)
    elif osp.isdir(path):
        shutil.rmtree(path)


def _mim_sources():
    found = [(n, osp.join(HERE, n)) for n in MIM_FILES
             if osp.exists(osp.join(HERE, n))]
    missing = sorted(set(MIM_FILES) - {n for n, _ in found})
    if missing:
        raise FileNotFoundError(
            f'mmbhvit: {missing} not found in {HERE}: they are package data '
            f'for mim (mmbhvit/.mim); an sdist must include them '
            '(MANIFEST.in)')
    return found


def write_mim_files(mim_dir, mode):
    """Fill ``mim_dir`` with ``MIM_FILES``: ``'symlink'`` or ``'copy'``."""
    os.makedirs(mim_dir, exist_ok=True)
    for name, src in _mim_sources():
        dst = osp.join(mim_dir, name)
        _remove(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_dir), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=MIM_IGNORE)
        else:
            shutil.copyfile(src, dst)


class BuildPyWithMim(_build_py):
    """build_py that also provides mmbhvit/.mim (see above)."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            # pip install -e . (PEP 660): the package is imported from the
            # source tree, so .mim goes there.
            write_mim_files(
                osp.join(HERE, 'mmbhvit', '.mim'),
                'copy' if sys.platform == 'win32' else 'symlink')
        else:
            write_mim_files(
                osp.join(self.build_lib, 'mmbhvit', '.mim'), 'copy')


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
    # geo: GeoTIFF scenes (remote sensing), see requirements/optional.txt
    # onnx: mmbhvit.deploy.onnx / tools/deployment/pytorch2onnx.py (export
    # needs onnx; running needs onnxruntime and/or openvino)
    extras_require={'tests': ['pytest'], 'geo': ['rasterio>=1.3'],
                    'onnx': ['onnx>=1.16', 'onnxruntime>=1.18',
                             'openvino>=2024.0']},
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    ext_modules=EXT_MODULES,
    cmdclass=dict(CMDCLASS, build_py=BuildPyWithMim),
    zip_safe=False,
)
