"""Module artifacts: a zip or tar.gz of a folder, packed and unpacked safely in memory.

Unpacking refuses absolute paths, `..`, links and special files, more than `max_files` entries,
more than `max_bytes` of uncompressed content (counted while reading, so a zip bomb that lies
about its sizes is stopped too), and, when the caller names the paths an archive may hold, any
other path and any file past its own cap. A `.safetensors` file must be exactly the size its
header declares, checked before its tensor data is read. Every archive is read to its end and its
checksums verified (each zip member's CRC-32; a gzip stream is decompressed whole, trailer CRC and
length included, before its tar is read); any read error is an `ArtifactError`. A single top-level
folder is stripped, so both `zip -r m.zip m/` and `cd m && zip m.zip *` work.
"""

from __future__ import annotations

import gzip
import io
import json
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
_SAFETENSORS_HEADER_BYTES = 16 << 20  # the most a safetensors header may take
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

    def read(self, f, name: str, cap: int | None = None, n: int | None = None) -> bytes:
        """`n` bytes of `f` (fewer at its end), or all of it; past `cap` bytes of this member or the
        archive's byte budget is 413."""
        out = bytearray()
        while chunk := f.read(_CHUNK if n is None else min(_CHUNK, n - len(out))):
            self.bytes += len(chunk)
            out += chunk
            if self.bytes > self.max_bytes:
                raise ArtifactTooLarge(f"archive unpacks to more than {self.max_bytes} bytes")
            if cap is not None and len(out) > cap:
                raise ArtifactTooLarge(f"{name} unpacks to more than {cap} bytes")
        return bytes(out)


def _tensor_bytes(header: bytes, name: str) -> int:
    """The bytes of tensor data a safetensors header declares (the end of its last tensor)."""
    try:
        entries = json.loads(header)
        ends = [int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ArtifactError(f"{name} has no valid safetensors header: {e}") from e
    if any(end < 0 for end in ends):
        raise ArtifactError(f"{name} has a negative tensor offset")
    return max(ends, default=0)


def _read_member(f, name: str, cap: int | None, budget: _Budget) -> bytes:
    """The member's bytes. A safetensors file's size is fixed by its header (8 + header + tensor
    data): a larger declared size than the caps allow is refused before its data is read, and the
    file must be exactly that size."""
    if not name.endswith(".safetensors"):
        return budget.read(f, name, cap)
    head = budget.read(f, name, cap, 8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= n <= _SAFETENSORS_HEADER_BYTES:
        raise ArtifactError(f"{name} is not a safetensors file (header length {n})")
    header = budget.read(f, name, cap, n)
    if len(header) != n:
        raise ArtifactError(f"{name} ends inside its header")
    size = 8 + n + _tensor_bytes(header, name)
    limit = 8 + n + budget.max_bytes - budget.bytes  # what the archive's budget has left, header included
    if cap is not None:
        limit = min(limit, cap)
    if size > limit:
        raise ArtifactTooLarge(f"{name} declares {size} bytes of tensors and header; the limit is {limit}")
    data = budget.read(f, name, cap, size - 8 - n)
    if len(data) != size - 8 - n or f.read(1):
        raise ArtifactError(f"{name} is not the {size} bytes its header declares")
    return head + header + data


def _top_folder(names: list[str]) -> str:
    """The single top-level folder every file is in ('m/'), or ''."""
    roots = {n.split("/", 1)[0] for n in names}
    return f"{roots.pop()}/" if len(roots) == 1 and all("/" in n for n in names) else ""


def _read_entries(entries: list, open_member, budget: _Budget, members: dict[str, int | None] | None
                  ) -> dict[str, bytes]:
    """Read (path, declared size, member) entries, checking each before reading it."""
    if not entries:
        raise ArtifactError("archive is empty")
    top = _top_folder([path for path, _, _ in entries])
    files = {}
    for path, size, member in entries:
        budget.add_file()
        name = path.removeprefix(top)
        if size > budget.max_bytes:
            raise ArtifactTooLarge(f"{name} unpacks to more than {budget.max_bytes} bytes")
        if members is not None and name not in members:
            raise ArtifactError(f"{name!r} is not a file of a module artifact (allowed: {', '.join(sorted(members))};"
                                f" weights are safetensors, never pickle)")
        cap = members.get(name) if members is not None else None
        if cap is not None and size > cap:
            raise ArtifactTooLarge(f"{name} unpacks to more than {cap} bytes")
        with open_member(member) as f:
            files[name] = _read_member(f, name, cap, budget)
    return files


def _read_zip(data: bytes, budget: _Budget, members) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            entries = []
            for info in z.infolist():
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ArtifactError(f"link in archive: {info.filename!r}")
                name = _check_name(info.filename)
                if name is not None and not info.is_dir():
                    entries.append((name, info.file_size, info))
            return _read_entries(entries, z.open, budget, members)
    except ArtifactError:
        raise
    except _READ_ERRORS as e:
        raise ArtifactError(f"not a valid zip archive: {e}") from e


def _read_tar(data: bytes, budget: _Budget, members) -> dict[str, bytes]:
    try:
        if data[:2] == b"\x1f\x8b":  # the whole stream first: its trailer's CRC and length are checked at its end
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                data = _Budget(0, budget.max_bytes + _TAR_OVERHEAD).read(g, "the gzip stream")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
            entries = []
            for member in t.getmembers():
                name = _check_name(member.name)
                if member.isdir():
                    continue
                if not member.isreg():
                    raise ArtifactError(f"link or special file in archive: {member.name!r}")
                if name is not None:
                    entries.append((name, member.size, member))
            return _read_entries(entries, t.extractfile, budget, members)
    except ArtifactError:
        raise
    except _READ_ERRORS as e:
        raise ArtifactError(f"not a valid tar archive: {e}") from e


def read_artifact(data: bytes, members: dict[str, int | None] | None = None, max_files: int = MAX_FILES,
                  max_bytes: int = MAX_BYTES) -> dict[str, bytes]:
    """Unpack a zip or tar(.gz) archive into {relative path: bytes}, safely. `members`: the only
    paths it may hold, each with the most bytes it may unpack to (None: the archive's budget)."""
    budget = _Budget(max_files, max_bytes)
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _read_zip(data, budget, members)
    if data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar":
        return _read_tar(data, budget, members)
    raise ArtifactError("artifact must be a zip or tar.gz archive")
