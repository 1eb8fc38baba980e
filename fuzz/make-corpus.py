#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/.

Seeds are well-formed inputs in each target's input format (see the comment at the top of
each fuzz_targets/*.rs), so that the fuzzer starts from messages and tables that get far
into the code, and mutates from there. Rerun after changing an input format:
    python3 fuzz/make-corpus.py
"""
import base64
import hashlib
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent
FIXTURES = ROOT.parent / "tests" / "fixtures"

VERSION, NEED_REPLY = 1, 8
GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_MAX_MEM_SLOTS = 15, 16, 36
ADD_MEM_REG, REM_MEM_REG = 37, 38
COCO_GET_CAPS, COCO_EXIT, COCO_DONE = 0x43430001, 0x43430002, 0x43430003
PF_ALL = (1 << 3) | (1 << 15) | (1 << 48)

GUIDS = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
    "crl": "92f81bc3-5811-4d3d-97ff-d19f88dc67ea",
}


def guid(name):
    return bytes.fromhex(GUIDS[name].replace("-", ""))


def header(request, size, flags=VERSION):
    return struct.pack("<III", request, flags, size)


def region(gpa, size, offset, uaddr=0):
    return struct.pack("<QQQQ", gpa, size, uaddr, offset)


def mem_table(regions):
    return struct.pack("<II", len(regions), 0) + b"".join(regions)


def rfc_record(gpa, npages, nr=0):
    return struct.pack("<B7xIIQI4x", nr, 0, 0, gpa // 4096, npages)


def snp_record(gpa, npages):
    return struct.pack("<QQQ", gpa, npages, 0)


def exit_msg(abi, vcpu, record):
    return struct.pack("<IIIIQ", abi, vcpu, len(record), 0, 0) + record


def table(entries):
    """A GHCB certificate table from (guid name, DER bytes), packed densely."""
    head = 24 * (len(entries) + 1)
    out, data, at = b"", b"", head
    for name, der in entries:
        out += guid(name) + struct.pack("<II", at, len(der))
        data += der
        at += len(der)
    return out + bytes(24) + data


def der(length, fill):
    content = length - 4
    return bytes([0x30, 0x82, content >> 8, content & 0xFF]) + bytes([fill]) * content


def pem(path):
    lines = path.read_text().split("\n")
    body = "".join(l for l in lines if l and not l.startswith("-----"))
    return base64.b64decode(body)


def write(target, seeds):
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for seed in seeds:
        (d / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    print(f"{target}: {len(seeds)} seeds in {d.relative_to(ROOT.parent)}")


def wire_seeds():
    def msg(request, payload=b"", nfds=0, flags=VERSION):
        return header(request, len(payload), flags) + bytes([nfds]) + payload

    u64 = lambda v: struct.pack("<Q", v)
    regions = [region(0, 1 << 20, 0), region(1 << 20, 1 << 20, 1 << 20)]
    return [
        msg(GET_FEATURES),
        msg(SET_FEATURES, u64(1 << 30), flags=VERSION | NEED_REPLY),
        msg(SET_OWNER),
        msg(GET_PROTOCOL_FEATURES),
        msg(SET_PROTOCOL_FEATURES, u64(PF_ALL)),
        msg(GET_MAX_MEM_SLOTS),
        msg(SET_MEM_TABLE, mem_table(regions), nfds=2, flags=VERSION | NEED_REPLY),
        msg(ADD_MEM_REG, u64(0) + regions[0], nfds=1),
        msg(REM_MEM_REG, u64(0) + regions[1]),
        msg(COCO_GET_CAPS),
        msg(COCO_EXIT, exit_msg(1, 0, rfc_record(0x1000, 4))),
        msg(COCO_EXIT, exit_msg(2, 3, snp_record(0x2000, 0))),
        msg(COCO_DONE, u64(1), flags=VERSION | NEED_REPLY),
        # A capabilities reply payload, for Caps::decode.
        msg(COCO_GET_CAPS | 0, struct.pack("<QQII8x", 6, 1, 64, 5000), flags=VERSION | 4),
    ]


def session_seeds():
    """Session input: config byte, then messages (selector, flags, nfds, fd kinds, fields)."""
    sel = {r: i for i, r in enumerate([
        GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE, GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES, GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, COCO_GET_CAPS,
        COCO_EXIT, COCO_DONE])}

    def m(request, fields=b"", need_reply=False, fds=b""):
        return bytes([sel[request], 1 if need_reply else 0, len(fds)]) + fds + fields

    handshake = m(GET_FEATURES) + m(SET_FEATURES, b"\x00") + m(GET_PROTOCOL_FEATURES) \
        + m(SET_PROTOCOL_FEATURES, b"\x07") + m(SET_OWNER, need_reply=True)
    # Region fields: gpa pages, size pages, offset pages (each one byte).
    add = m(ADD_MEM_REG, bytes([0, 16, 0]), need_reply=True, fds=b"\x00")
    table2 = m(SET_MEM_TABLE, bytes([2, 0, 8, 0, 8, 8, 8]), need_reply=True, fds=b"\x00\x00")
    # Exit fields: tag, structured (non-zero mod 8), gpa pages, npages, vcpu.
    snp = m(COCO_EXIT, bytes([2, 1, 1, 4, 0]))
    rfc = m(COCO_EXIT, bytes([1, 1, 2, 2, 1]))
    probe = m(COCO_EXIT, bytes([2, 1, 1, 0, 2]))
    outside = m(COCO_EXIT, bytes([1, 1, 40, 4, 3]))
    done = m(COCO_DONE, b"\x00", need_reply=True)
    caps = m(COCO_GET_CAPS) + m(GET_MAX_MEM_SLOTS)
    remove = m(REM_MEM_REG, bytes([0, 16, 0]), need_reply=True)
    return [
        b"\x00" + handshake,
        b"\x00" + handshake + caps + add + snp + done,
        b"\x00" + handshake + table2 + rfc + probe + outside + done,
        b"\x00" + handshake + add + snp + rfc + snp + done + remove + snp,
        b"\x01" + handshake + m(ADD_MEM_REG, bytes([0, 16, 0]), True, b"\x01") + probe + snp,
        b"\x00" + m(COCO_EXIT, bytes([2, 1, 1, 4, 0])),  # before negotiation
    ]


def reader_seeds():
    """Message reader input: pieces of (control byte: length - 1, bit 7 = one fd; bytes)."""
    u64 = lambda v: struct.pack("<Q", v)

    def pieces(stream, cuts, fd_at=()):
        out, start = b"", 0
        for i, end in enumerate(list(cuts) + [len(stream)]):
            while start < end:
                n = min(end - start, 128)
                out += bytes([(n - 1) | (0x80 if i in fd_at and start == (cuts[i - 1] if i else 0) else 0)])
                out += stream[start:start + n]
                start += n
        return out

    done = header(COCO_DONE, 8) + u64(1)
    add = header(ADD_MEM_REG, 40, VERSION | NEED_REPLY) + u64(0) + region(0, 1 << 20, 0)
    exit_ = header(COCO_EXIT, 48) + exit_msg(2, 0, snp_record(0x1000, 4))
    feats = header(GET_FEATURES, 0)
    return [
        pieces(feats, []),
        pieces(done + add, [len(done)], fd_at=(1,)),
        pieces(add + exit_ + done, [len(add), len(add) + len(exit_)], fd_at=(0,)),
        pieces(exit_, [5, 12, 30]),
        pieces(feats + feats + done, [3]),
    ]


def table_seeds():
    syn = FIXTURES / "synthetic"
    amd = FIXTURES / "amd"
    return [
        bytes(24),
        table([("ark", der(300, 1))]),
        table([("ark", der(700, 1)), ("ask", der(600, 2)), ("vcek", der(500, 3))]),
        table([("ark", (syn / "ark.der").read_bytes()), ("ask", (syn / "ask.der").read_bytes()),
               ("vlek", (syn / "vlek.der").read_bytes()), ("crl", (syn / "crl.der").read_bytes())]),
        table([("ark", pem(amd / "ark-milan.pem")), ("ask", pem(amd / "ask-milan.pem")),
               ("vcek", (amd / "vcek-milan.der").read_bytes())]),
        # Refused ones: trailing bytes, and both VCEK and VLEK.
        table([("ark", der(300, 1))]) + b"\x00",
        table([("vcek", der(300, 1)), ("vlek", der(300, 2))]),
    ]


def guest_ram_seeds():
    """Ops of fuzz_targets/guest_ram.rs: files 0 and 1 are tmpfs memfds, 2 a hugetlb one
    (where the kernel has it), then a write-sealed memfd, a read-only one and /dev/null."""

    def addr(page):
        return bytes([2]) + struct.pack("<H", page)

    def add(file, gpa, size, off):
        return bytes([0, file]) + addr(gpa) + addr(size) + addr(off)

    def write_at(gpa, buf_pages, length, fill=7):
        return bytes([4]) + addr(gpa) + struct.pack("<HH", buf_pages, length) + bytes([0, fill])

    def change(file, size, punch):
        return bytes([3, file]) + struct.pack("<H", size) + bytes([punch])

    return [
        add(0, 0, 16, 0) + write_at(1, 2, 5000),
        add(0, 0, 4, 0) + add(1, 4, 4, 8) + write_at(3, 2, 8000),
        add(2, 0, 512, 0) + write_at(1, 4, 3000),
        add(0, 0, 16, 0) + change(0, 0, 0) + write_at(2, 1, 4000),
        add(0, 0, 16, 0) + change(0, 8, 1) + write_at(0, 4, 12000),
        add(3, 0, 16, 0) + add(4, 0, 16, 0) + add(5, 0, 16, 0) + add(0, 0, 16, 0),
        add(0, 0, 16, 0) + bytes([2, 0]) + write_at(1, 1, 100),
        add(1, 100, 16, 0) + write_at(99, 4, 100),
    ]


if __name__ == "__main__":
    write("wire_decode", wire_seeds())
    write("session", session_seeds())
    write("table_parse", table_seeds())
    write("message_reader", reader_seeds())
    write("guest_ram", guest_ram_seeds())
