# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Read the size of an image file from its header, never its pixels.

The data checks of ``tools/train.py`` / ``tools/test.py`` call
:func:`read_image_header` on every image and annotation of a split, so it has
to be cheap: PNG, JPEG, TIFF and BMP headers are parsed here (one 4 KiB read
for almost every file, plus a 256-byte read of a PNG's end), other formats go
through Pillow's ``Image.open``, which is lazy too (it parses the header and
decodes nothing until ``load()``). Only a file neither can identify is handed
to OpenCV, which decodes it: if OpenCV can load it, training could too.

What is reported as an :class:`ImageFileError` (naming the file) is what
would stop loading later: a 0-byte file, a file that is not an image, a
header cut short, a PNG without its final ``IEND`` chunk or a JPEG without
its end marker (a truncated copy: OpenCV 5 returns nothing for either, Pillow
reports "image file is truncated"). Only the header and the last bytes are
read, so damage in the middle of the compressed data is not seen.

Sizes: :attr:`ImageHeader.size` is the stored ``(width, height)``;
:attr:`ImageHeader.loaded_size` is the size a colour loader returns. mmcv's
``imfrombytes(flag='color')`` applies the EXIF orientation with both its
``cv2`` and ``pillow`` backends (orientations 5-8 swap width and height), as
images are loaded by ``LoadImageFromFile``; label maps are loaded with
``flag='unchanged'``, which ignores it except in TIFF files (both decoders
apply a TIFF's orientation tag whatever the flag):
:attr:`ImageHeader.unchanged_size`.
"""
import os
import stat
import struct
from typing import NamedTuple, Tuple

__all__ = ['ImageFileError', 'ImageHeader', 'read_image_header',
           'check_image_file']

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_IEND = b'IEND\xaeB`\x82'
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic;
#: not DHT C4, JPG C8, DAC CC).
JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA,
                      0xCB, 0xCD, 0xCE, 0xCF))
#: The first read: the header of nearly every PNG/JPEG/BMP fits in it.
HEAD_BYTES = 4096
#: How far from its end a PNG's IEND chunk may be (a few trailing bytes are
#: tolerated, as decoders ignore them).
TAIL_BYTES = 256
#: How far a JPEG parser looks for the next marker in corrupt data before
#: giving up (decoders skip "extraneous bytes before marker" too).
JPEG_MAX_SKIP = 1 << 16
#: Bytes after a JPEG's end marker that are still accepted (camera trailers).
JPEG_MAX_TRAILER = 1 << 16
ORIENTATION_TAG = 0x0112
#: The most of an EXIF block read for its orientation (JPEG APP1 segments
#: are at most 64 KiB anyway).
EXIF_MAX_BYTES = 1 << 16


class ImageFileError(ValueError):
    """An image file that cannot be read: the message names the file."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f'{path}: {problem}')


class ImageHeader(NamedTuple):
    """What the header of an image file says."""
    #: ``'png'``, ``'jpeg'``, ``'tiff'``, ``'bmp'`` or Pillow's format name.
    format: str
    #: ``(width, height)`` as stored.
    size: Tuple[int, int]
    #: EXIF orientation (1-8), 1 when there is none.
    orientation: int = 1

    @property
    def loaded_size(self) -> Tuple[int, int]:
        """``(width, height)`` after the EXIF rotation that colour loaders
        (mmcv ``flag='color'``, cv2 and pillow backends) apply."""
        w, h = self.size
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)

    @property
    def unchanged_size(self) -> Tuple[int, int]:
        """``(width, height)`` as loaded with ``flag='unchanged'`` (label
        maps): the stored size, except for TIFF, whose orientation both
        OpenCV and Pillow apply whatever the flag."""
        return self.loaded_size if self.format == 'tiff' else self.size


class _File:
    """Random access to the first bytes of a file with as few reads as
    possible: the first :data:`HEAD_BYTES` are kept, anything else is read
    on demand (``os.pread`` on an OS file descriptor: no Python file
    object, no seek)."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.head = self._read(0, HEAD_BYTES)
        self.window_start, self.window = 0, self.head

    if hasattr(os, 'pread'):
        def _read(self, offset: int, n: int) -> bytes:
            return os.pread(self.fd, n, offset)
    else:  # Windows
        def _read(self, offset: int, n: int) -> bytes:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.read(self.fd, n)

    def get(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, fewer only at the end of the file."""
        # at most to the end of the file: a corrupt length in a header must
        # not allocate a huge buffer
        n = min(n, max(0, self.size - offset))
        if offset + n <= len(self.head):
            return self.head[offset:offset + n]
        start = offset - self.window_start
        if 0 <= start and offset + n <= self.window_start + len(self.window):
            return self.window[start:start + n]
        self.window_start = offset
        self.window = self._read(offset, max(n, HEAD_BYTES))
        return self.window[:n]

    def exact(self, offset: int, n: int, what: str) -> bytes:
        data = self.get(offset, n)
        if len(data) < n:
            raise _Problem(f'the file ends inside the {what} (at byte '
                           f'{offset + len(data)} of {self.size}): truncated')
        return data


class _Problem(Exception):
    """Raised inside the parsers; turned into :class:`ImageFileError`."""


# --------------------------------------------------------------------------
# TIFF structures (TIFF files and EXIF blocks)
# --------------------------------------------------------------------------
def _tiff_ifd0(get, what: str) -> dict:
    """The SHORT/LONG entries of IFD0 of a TIFF structure, ``{tag: value}``
    (first value only). ``get(offset, n)`` reads relative to the structure's
    start."""
    head = get(0, 8)
    if len(head) < 8:
        raise _Problem(f'the {what} is cut short')
    if head[:4] == b'II*\x00':
        end = '<'
    elif head[:4] == b'MM\x00*':
        end = '>'
    else:
        raise _Problem(f'the {what} has no TIFF byte-order mark')
    ifd = struct.unpack(end + 'I', head[4:8])[0]
    count_bytes = get(ifd, 2)
    if len(count_bytes) < 2:
        raise _Problem(f'the {what} points to a directory beyond its end '
                       f'(offset {ifd}): truncated')
    count = struct.unpack(end + 'H', count_bytes)[0]
    entries = get(ifd + 2, 12 * count)
    if len(entries) < 12 * count:
        raise _Problem(f'the {what}\'s directory is cut short: truncated')
    tags = {}
    for i in range(count):
        tag, typ, n = struct.unpack(end + 'HHI', entries[12 * i:12 * i + 8])
        value = entries[12 * i + 8:12 * i + 12]
        if n < 1:
            continue
        if typ == 3:  # SHORT
            tags[tag] = struct.unpack(end + 'H', value[:2])[0]
        elif typ == 4:  # LONG
            tags[tag] = struct.unpack(end + 'I', value)[0]
    return tags


def _exif_orientation(exif: bytes) -> int:
    """The orientation tag of an EXIF block (TIFF structure); 1 when the
    block is unreadable (decoders then ignore it as well)."""
    try:
        value = _tiff_ifd0(lambda o, n: exif[o:o + n],
                           'EXIF block').get(ORIENTATION_TAG, 1)
    except (_Problem, struct.error):
        return 1
    return value if 1 <= value <= 8 else 1


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------
def _png(fh: _File) -> ImageHeader:
    ihdr = fh.exact(8, 25, 'PNG header')
    length, kind = struct.unpack('>I4s', ihdr[:8])
    if kind != b'IHDR' or length != 13:
        raise _Problem('a PNG signature without an IHDR header chunk')
    width, height = struct.unpack('>II', ihdr[8:16])
    if width == 0 or height == 0:
        raise _Problem(f'the PNG header gives a size of {width}x{height}')
    # chunks up to the first IDAT (where decoders read the header): eXIf
    orientation = 1
    pos = 33
    while True:
        chunk = fh.get(pos, 8)
        if len(chunk) < 8:
            raise _Problem('the file ends before the image data (no IDAT '
                           'chunk): truncated')
        length, kind = struct.unpack('>I4s', chunk)
        if kind == b'IDAT':
            break
        if kind == b'IEND':
            raise _Problem('a PNG without image data (IEND before any IDAT)')
        if kind == b'eXIf':  # IFD0 is at its start
            orientation = _exif_orientation(
                fh.get(pos + 8, min(length, EXIF_MAX_BYTES)))
        pos += 12 + length
    tail = fh.get(max(0, fh.size - TAIL_BYTES), TAIL_BYTES)
    if PNG_IEND not in tail:
        raise _Problem(
            'the PNG does not end with its IEND chunk: the file is '
            f'truncated ({fh.size} bytes)')
    return ImageHeader('png', (width, height), orientation)


def _jpeg(fh: _File) -> ImageHeader:
    orientation = 1
    pos = 2
    while True:
        # find the next marker (0xFF, any number of fill 0xFF, a code)
        skipped = 0
        while True:
            byte = fh.get(pos, 1)
            if not byte:
                raise _Problem('the file ends before the JPEG frame header '
                               '(SOF): truncated')
            if byte == b'\xff':
                break
            pos += 1
            skipped += 1
            if skipped > JPEG_MAX_SKIP:
                raise _Problem(f'no JPEG marker in {JPEG_MAX_SKIP} bytes '
                               f'after byte {pos - skipped}: corrupt')
        while fh.get(pos + 1, 1) == b'\xff':
            pos += 1
        code_byte = fh.get(pos + 1, 1)
        if not code_byte:
            raise _Problem('the file ends inside a JPEG marker: truncated')
        code = code_byte[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # no length
            pos += 2
            continue
        if code in (0xD9, 0xDA):  # EOI / start of scan before any SOF
            raise _Problem('a JPEG without frame header (no SOF marker '
                           'before the image data)')
        length = struct.unpack('>H', fh.exact(pos + 2, 2, 'JPEG header'))[0]
        if length < 2:
            raise _Problem(f'a JPEG segment of length {length} at byte '
                           f'{pos}: corrupt')
        if code in JPEG_SOF:
            sof = fh.exact(pos + 4, 5, 'JPEG frame header')
            height, width = struct.unpack('>HH', sof[1:5])
            if width == 0 or height == 0:
                raise _Problem(f'the JPEG frame header gives a size of '
                               f'{width}x{height}')
            break
        if code == 0xE1 and orientation == 1:  # APP1: EXIF?
            seg = fh.get(pos + 4, length - 2)
            if seg[:6] == b'Exif\x00\x00':
                orientation = _exif_orientation(seg[6:])
        pos += 2 + length
    # The end marker (EOI) ends the file, or precedes a trailer (tolerated
    # by decoders) of at most JPEG_MAX_TRAILER bytes; without it OpenCV
    # refuses the file and Pillow reports it truncated.
    if b'\xff\xd9' not in fh.get(max(0, fh.size - TAIL_BYTES), TAIL_BYTES) \
            and b'\xff\xd9' not in fh.get(max(0, fh.size - JPEG_MAX_TRAILER),
                                         JPEG_MAX_TRAILER):
        raise _Problem(
            f'the JPEG has no end marker (EOI) in its last {JPEG_MAX_TRAILER}'
            f' bytes: the file is truncated ({fh.size} bytes; OpenCV cannot '
            'decode it)')
    return ImageHeader('jpeg', (width, height), orientation)


def _tiff(fh: _File) -> ImageHeader:
    tags = _tiff_ifd0(lambda o, n: fh.get(o, n), 'TIFF header')
    if 256 not in tags or 257 not in tags:
        raise _Problem('the TIFF directory has no image width/length')
    width, height = tags[256], tags[257]
    if width == 0 or height == 0:
        raise _Problem(f'the TIFF header gives a size of {width}x{height}')
    orientation = tags.get(ORIENTATION_TAG, 1)
    return ImageHeader('tiff', (width, height),
                       orientation if 1 <= orientation <= 8 else 1)


def _bmp(fh: _File) -> ImageHeader:
    head = fh.exact(14, 12, 'BMP header')
    dib = struct.unpack('<I', head[:4])[0]
    if dib == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack('<HH', head[4:8])
    elif dib >= 40:
        width, height = struct.unpack('<ii', head[4:12])
        height = abs(height)  # negative: stored top-down
    else:
        raise _Problem(f'a BMP with an unknown header size ({dib})')
    if width <= 0 or height <= 0:
        raise _Problem(f'the BMP header gives a size of {width}x{height}')
    return ImageHeader('bmp', (width, height))


def _other(path: str, head: bytes) -> ImageHeader:
    """Pillow (lazy: header only), else OpenCV (decodes) as a last resort:
    a format neither can read would fail at load time too."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            size = img.size
            fmt = (img.format or 'unknown').lower()
            try:
                orientation = int(img.getexif().get(ORIENTATION_TAG, 1))
            except Exception:  # unreadable EXIF: decoders ignore it too
                orientation = 1
        if size[0] <= 0 or size[1] <= 0:
            raise _Problem(f'the {fmt} header gives a size of '
                           f'{size[0]}x{size[1]}')
        return ImageHeader(fmt, size,
                           orientation if 1 <= orientation <= 8 else 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            struct.error):
        pass
    import cv2
    import numpy as np
    with open(path, 'rb') as f:
        data = np.frombuffer(f.read(), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise _Problem('not an image (neither Pillow nor OpenCV can read it;'
                       f' it starts with {head[:16]!r})')
    return ImageHeader('opencv', (img.shape[1], img.shape[0]))


def read_image_header(path: str) -> ImageHeader:
    """Format, size and EXIF orientation of the image file ``path``, from
    its header.

    Raises:
        FileNotFoundError: ``path`` does not exist (other ``OSError``, e.g.
            no permission, pass through as well).
        ImageFileError: the file is empty, not an image, or its header is
            cut short or corrupt (the message names the file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_BINARY', 0))
    except (IsADirectoryError, PermissionError):
        if os.path.isdir(path):  # Windows cannot open folders
            raise ImageFileError(path, 'a folder, not an image file') from None
        raise
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageFileError(path, 'a folder, not an image file')
        if info.st_size == 0:
            raise ImageFileError(path, 'empty file (0 bytes)')
        fh = _File(fd, info.st_size)
        head = fh.head
        try:
            if head.startswith(PNG_SIGNATURE):
                return _png(fh)
            if head.startswith(b'\xff\xd8\xff'):
                return _jpeg(fh)
            if head[:4] in (b'II*\x00', b'MM\x00*'):
                return _tiff(fh)
            if head.startswith(b'BM'):
                return _bmp(fh)
        except (_Problem, struct.error) as e:
            raise ImageFileError(path, str(e)) from None
    finally:
        os.close(fd)
    try:
        return _other(path, head)
    except _Problem as e:
        raise ImageFileError(path, str(e)) from None


def check_image_file(path: str) -> ImageHeader:
    """:func:`read_image_header`, with a missing file reported as an
    :class:`ImageFileError` too (for tools that take an image path)."""
    try:
        return read_image_header(path)
    except FileNotFoundError:
        raise ImageFileError(path, 'no such file') from None
