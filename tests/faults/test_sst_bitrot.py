"""Bit rot in a live SST file of the SSD tier: a clear error naming the file, whatever
kind of block the flip hits; never a silently wrong or missing row."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from terarec.ps.tiers.ssd import SSDTier, SSDTierConfig, SSDTierError
from terarec.ps.tiers.sst_check import check_sst

W = 8
N = 20_000


def rows() -> torch.Tensor:
    return torch.arange(N * W, dtype=torch.float32).view(N, W)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return out, i


def sst_blocks(data: bytes) -> dict[str, tuple[int, int]]:
    """``{part: (start, end)}`` of a block-based SST file (format 6, what the pinned
    RocksDB writes): the data blocks, the filter, index and properties blocks (located
    by their metaindex entries: key, then the block handle as two varints), the
    metaindex block and the footer. Each block's range includes its 5-byte trailer
    (compression type, checksum)."""
    meta = {}
    for part, name in (("filter", b"fullfilter.rocksdb.BuiltinBloomFilter"),
                       ("index", b"rocksdb.index"), ("properties", b"rocksdb.properties")):
        p = data.rfind(name)
        # a metaindex entry: varints shared (0: restart interval 1), key length, value length
        assert p > 3 and data[p - 3] == 0 and data[p - 2] == len(name), (part, p)
        off, i = _varint(data, p + len(name))
        size, _ = _varint(data, i)
        meta[part] = (off, off + size + 5)
    footer = len(data) - 53  # format 6: checksum type, extended magic, ... , magic
    assert data[-8:] == bytes.fromhex("f7cff485b741e288"), "not a block-based table"
    assert int.from_bytes(data[-12:-8], "little") == 6, "another SST format version"
    meta["data"] = (0, min(a for a, _ in meta.values()))
    meta["metaindex"] = (max(b for _, b in meta.values()), footer)
    meta["footer"] = (footer, len(data))
    return meta


def test_flipped_bits_in_every_block_kind_are_caught(tmp_path: Path) -> None:
    """One bit flipped in each kind of block of the SST file (data blocks spread over the
    file, the bloom filter, the index, the properties, the metaindex, the footer), each
    in a fresh copy of the DB, reopened so no cached block hides the flip: every flip
    raises SSDTierError naming the damaged file (data and index blocks: RocksDB's block
    checksums, verified on read; filter, properties and metaindex blocks: the tier's
    check of the meta blocks on open; the footer: its magic number and checksum). Never
    a silently wrong or missing row."""
    clean = tmp_path / "clean"
    cfg = SSDTierConfig(path=str(clean), block_cache_mb=8, write_buffer_mb=4)
    tier = SSDTier.open(cfg, row_width=W)
    tier.insert(torch.arange(N), rows())
    tier.flush()
    tier.close()
    (sst,) = sorted(clean.rglob("*.sst"))
    blocks = sst_blocks(sst.read_bytes())
    assert blocks["data"][1] > 0.9 * sst.stat().st_size  # the rows are most of the file

    def spread(part: str, n: int) -> list[int]:
        a, b = blocks[part]
        return [a + (b - a) * (2 * i + 1) // (2 * n) for i in range(n)]

    counts = {"data": 12, "filter": 3, "index": 3, "properties": 2, "metaindex": 2, "footer": 2}
    caught = {part: sum(read_with_flip(tmp_path / f"{part}{at}", clean, sst, at)
                        for at in spread(part, n)) for part, n in counts.items()}
    assert caught == counts


def test_without_the_meta_block_check_a_damaged_filter_goes_unreported(tmp_path: Path) -> None:
    """Why the tier checks meta blocks itself: with ``verify_filters: false`` a flipped
    filter bit is not reported by RocksDB (it reads past a filter it cannot load); the
    rows still come back exactly."""
    clean = tmp_path / "clean"
    tier = SSDTier.open(SSDTierConfig(path=str(clean), block_cache_mb=8, write_buffer_mb=4),
                        row_width=W)
    tier.insert(torch.arange(N), rows())
    tier.close()
    (sst,) = sorted(clean.rglob("*.sst"))
    assert check_sst(sst) is None
    a, b = sst_blocks(sst.read_bytes())["filter"]
    assert not read_with_flip(tmp_path / "off", clean, sst, (a + b) // 2, verify=False)
    db = tmp_path / "on"
    shutil.copytree(clean, db)
    hurt = db / sst.relative_to(clean)
    data = bytearray(hurt.read_bytes())
    data[(a + b) // 2] ^= 0x10
    hurt.write_bytes(bytes(data))
    damage = check_sst(hurt)
    assert damage is not None and "filter block" in damage and str(hurt) in damage


def read_with_flip(db: Path, clean: Path, sst: Path, at: int, verify: bool = True) -> bool:
    """Copies the DB, flips bit 4 of byte ``at`` of the SST file, reads every row: True
    when the damage was reported (naming the file), False when every row came back exact."""
    shutil.copytree(clean, db)
    hurt = db / sst.relative_to(clean)
    data = bytearray(hurt.read_bytes())
    data[at] ^= 0x10
    hurt.write_bytes(bytes(data))
    tier = None
    try:
        tier = SSDTier.open(SSDTierConfig(path=str(db), block_cache_mb=8, write_buffer_mb=4,
                                          verify_filters=verify), row_width=W)
        out = torch.zeros(N, W)
        missing = tier.find(torch.arange(N), out)
    except SSDTierError as e:
        msg = str(e)
        assert "Corruption" in msg and ("MANIFEST" in msg or str(hurt) in msg), msg
        assert "damaged" in msg and "another process" not in msg, msg
        return True
    finally:
        if tier is not None:
            tier.close()
        shutil.rmtree(db, ignore_errors=True)
    assert missing.numel() == 0 and torch.equal(out, rows()), at
    return False
