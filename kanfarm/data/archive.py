"""Reading the regular files of a ``.tar.gz`` archive in one pass, with the whole archive checked.

Iterating a tar stops silently at a damaged header, and gzip checks its CRC and length only at the
end of the stream, which a loader that stops after its last member never reaches: either way a
damaged archive could load as wrong or missing data. So the stream is always read to its end, it
must hold the tar's end-of-archive block, and what follows that block must be zero padding.
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Callable

from kanfarm.data.errors import DatasetFormatError

CHUNK = 1 << 20
EXTENDED_HEADER_BYTES = 1 << 16  # a long name or a few pax records; real archives need under 1 KiB
EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                  tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _GuardedTarInfo(tarfile.TarInfo):
    """tarfile reads an extended header (GNU long name, pax records) into memory whole, before any
    member limit applies, and ends the member list silently where the data ends, as if the archive
    were complete: both are refused here."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) < tarfile.BLOCKSIZE:  # the data ended where a header or the end block should be
            raise tarfile.ReadError("the tar stream ends without its end-of-archive block (truncated)")
        return super().frombuf(buf, encoding, errors)

    def _proc_member(self, tar):
        if self.type in EXTENDED_TYPES and self.size > EXTENDED_HEADER_BYTES:
            raise tarfile.ReadError(f"an extended tar header declares {self.size} bytes,"
                                    f" more than {EXTENDED_HEADER_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE:  # its map is read block by block into a list, unbounded
            raise _sparse(self.name)
        return super()._proc_member(tar)

    def _proc_gnusparse_10(self, next, pax_headers, *rest):  # pax sparse 1.0: a map read from the data alike
        raise _sparse(pax_headers.get("GNU.sparse.name", next.name))


def _sparse(name: str) -> tarfile.ReadError:
    return tarfile.ReadError(f"member {name} is a sparse file (its map would be read whole; "
                             "no dataset archive has one)")


def read_files(path: Path, wanted: Callable[[str], object], max_member_bytes: int,
               max_total_bytes: int, max_members: int) -> dict[str, bytes]:
    """Member name -> content of the regular files whose name ``wanted`` is truthy for; a damaged
    or truncated archive raises DatasetFormatError naming ``path``.

    A wanted member larger than ``max_member_bytes``, or members adding up to more than
    ``max_total_bytes``, or more than ``max_members`` of them (each an example: empty ones cost
    a few bytes of archive and a row of features each), or a sparse member (a few bytes in the
    archive that declare gigabytes) raise DatasetFormatError before being read, as does an
    extended header larger than ``EXTENDED_HEADER_BYTES``: a crafted file in a shared data
    folder must not exhaust a worker's memory. Nor does tarfile keep a record of every member
    passed (its member list is emptied as the stream goes)."""
    blobs: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz", tarinfo=_GuardedTarInfo) as tar:
            while (member := tar.next()) is not None:  # stream: nothing is extracted to disk
                tar.members.clear()  # ~500 bytes a member, of millions in a crafted archive
                if not (member.isfile() and wanted(member.name)):
                    continue
                total += member.size
                if member.issparse() or member.size > max_member_bytes or total > max_total_bytes:
                    raise DatasetFormatError(
                        f"{path}: member {member.name} declares {member.size} bytes"
                        f"{' (sparse)' if member.issparse() else ''}, more than this dataset's files hold")
                if len(blobs) == max_members:
                    raise DatasetFormatError(f"{path}: more than {max_members} files of this dataset, more "
                                             "than it holds")
                blobs[member.name] = tar.extractfile(member).read()
            while chunk := tar.fileobj.read(CHUNK):  # to EOF: gzip verifies CRC and length here
                if chunk.count(0) != len(chunk):
                    raise DatasetFormatError(f"{path}: damaged tar header near byte {tar.offset}"
                                             " (data follows where the member list ended)")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: not a readable tar.gz archive ({exc})") from exc
    except RecursionError as exc:  # tarfile recurses once per chained long-name header
        raise DatasetFormatError(f"{path}: not a readable tar.gz archive (too many chained headers)") from exc
    return blobs
