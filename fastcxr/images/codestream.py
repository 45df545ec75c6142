"""A compressed frame's own header, read without decoding it: the geometry a JPEG, JPEG-LS or
JPEG 2000 codestream declares (checked against the DICOM header before a decoder runs), and
whether the codestream ends with its end marker (a cut file)."""

from __future__ import annotations


def codestream_geometry(frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) from a JPEG / JPEG-LS frame header (SOFn) or a
    JPEG 2000 SIZ marker, without decoding; None when not found."""
    if frame[:2] == b"\xff\xd8":  # JPEG family: walk the marker segments to the frame header
        i = 2
        while i + 4 <= len(frame):
            if frame[i] != 0xFF:
                return None
            m = frame[i + 1]
            if m == 0xFF:  # fill byte
                i += 1
                continue
            if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
                i += 2
                continue
            if (0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)) or m == 0xF7:  # SOFn, SOF55
                if i + 10 > len(frame):
                    return None
                p, y = frame[i + 4], int.from_bytes(frame[i + 5 : i + 7], "big")
                x, nf = int.from_bytes(frame[i + 7 : i + 9], "big"), frame[i + 9]
                return (y, x, nf, p) if y else None  # y = 0: height set later by DNL
            if m == 0xDA:  # a scan before any frame header
                return None
            i += 2 + int.from_bytes(frame[i + 2 : i + 4], "big")
        return None
    k = frame.find(b"\xff\x4f\xff\x51", 0, 1 << 16)  # JPEG 2000: SOC then SIZ
    if k < 0 or k + 43 > len(frame):
        return None
    j = k + 2

    def u32(o: int) -> int:
        return int.from_bytes(frame[j + o : j + o + 4], "big")

    cols, rows = u32(6) - u32(14), u32(10) - u32(18)  # Xsiz - XOsiz, Ysiz - YOsiz
    comps = int.from_bytes(frame[j + 38 : j + 40], "big")
    return rows, cols, comps, (frame[j + 40] & 0x7F) + 1


def has_end_marker(frame: bytes) -> bool:
    """JPEG's EOI and JPEG 2000's EOC are both FFD9, found only as the last marker (allowing
    for a few padding bytes after it)."""
    return b"\xff\xd9" in frame[-64:]


__all__ = ["codestream_geometry", "has_end_marker"]
