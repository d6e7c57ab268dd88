"""Module artifacts: a zip or tar.gz of a folder, packed and unpacked safely in memory.

Unpacking refuses absolute paths, `..`, links and special files, more than `max_files` entries,
and more than `max_bytes` of uncompressed content (counted while reading, so a zip bomb that lies
about its sizes is stopped too). Every archive is read to its end and its checksums verified (each
zip member's CRC-32; a gzip stream is decompressed whole, trailer CRC and length included, before
its tar is read); any read error is an `ArtifactError`. A single top-level folder is stripped, so
both `zip -r m.zip m/` and `cd m && zip m.zip *` work.
"""

from __future__ import annotations

import gzip
import io
import lzma
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib

MAX_FILES = 64
MAX_BYTES = 512 * 1024 * 1024
_CHUNK = 1 << 20
_TAR_OVERHEAD = 1 << 20  # headers and padding a tar stream may add to its files' bytes
# what reading a damaged or hostile archive can raise (zipfile raises RuntimeError for an encrypted member)
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, NotImplementedError,
                RuntimeError, ValueError, OSError, zlib.error, lzma.LZMAError, struct.error)


class ArtifactError(ValueError):
    """The artifact is not a valid module (HTTP 422 unless a subclass says otherwise)."""


class ArtifactTooLarge(ArtifactError):
    """The artifact unpacks to more than the size cap (HTTP 413)."""


def pack(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def _check_name(name: str) -> str | None:
    """The normalised relative path, None for a directory entry; raises on anything unsafe."""
    if "\\" in name or "\x00" in name:
        raise ArtifactError(f"unsafe path in archive: {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArtifactError(f"absolute path in archive: {name!r}")
    if any(part == ".." for part in name.split("/")):
        raise ArtifactError(f"path with '..' in archive: {name!r}")
    norm = posixpath.normpath(name)
    if name.endswith("/") or norm in ("", "."):
        return None
    return norm


class _Budget:
    def __init__(self, max_files: int, max_bytes: int):
        self.files, self.bytes, self.max_files, self.max_bytes = 0, 0, max_files, max_bytes

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ArtifactError(f"archive has more than {self.max_files} files")

    def read(self, f) -> bytes:
        out = bytearray()
        while chunk := f.read(_CHUNK):
            self.bytes += len(chunk)
            if self.bytes > self.max_bytes:
                raise ArtifactTooLarge(f"archive unpacks to more than {self.max_bytes} bytes")
            out += chunk
        return bytes(out)


def _read_zip(data: bytes, budget: _Budget) -> dict[str, bytes]:
    files = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArtifactError(f"link in archive: {info.filename!r}")
                name = _check_name(info.filename)
                if name is None or info.is_dir():
                    continue
                budget.add_file()
                if info.file_size > budget.max_bytes:
                    raise ArtifactTooLarge(f"{name} unpacks to more than {budget.max_bytes} bytes")
                with z.open(info) as f:
                    files[name] = budget.read(f)
    except ArtifactError:
        raise
    except _READ_ERRORS as e:
        raise ArtifactError(f"not a valid zip archive: {e}") from e
    return files


def _read_tar(data: bytes, budget: _Budget) -> dict[str, bytes]:
    files = {}
    try:
        if data[:2] == b"\x1f\x8b":  # the whole stream first: its trailer's CRC and length are checked at its end
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                data = _Budget(0, budget.max_bytes + _TAR_OVERHEAD).read(g)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
            for member in t:
                name = _check_name(member.name)
                if member.isdir():
                    continue
                if not member.isreg():
                    raise ArtifactError(f"link or special file in archive: {member.name!r}")
                budget.add_file()
                if member.size > budget.max_bytes:
                    raise ArtifactTooLarge(f"{name} unpacks to more than {budget.max_bytes} bytes")
                f = t.extractfile(member)
                files[name] = budget.read(f)
    except ArtifactError:
        raise
    except _READ_ERRORS as e:
        raise ArtifactError(f"not a valid tar archive: {e}") from e
    return files


def read_artifact(data: bytes, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> dict[str, bytes]:
    """Unpack a zip or tar(.gz) archive into {relative path: bytes}, safely."""
    budget = _Budget(max_files, max_bytes)
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        files = _read_zip(data, budget)
    elif data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
        files = _read_tar(data, budget)
    else:
        raise ArtifactError("artifact must be a zip or tar.gz archive")
    if not files:
        raise ArtifactError("archive is empty")
    roots = {n.split("/", 1)[0] for n in files}
    if len(roots) == 1 and all("/" in n for n in files):
        files = {n.split("/", 1)[1]: b for n, b in files.items()}
    return files
