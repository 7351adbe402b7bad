"""Bit rot in a live SST file of the SSD tier: a clear error naming the file, or the
exact rows; never a silently wrong or missing row."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from terarec.ps.tiers.ssd import SSDTier, SSDTierConfig, SSDTierError

W = 8
N = 20_000


def rows() -> torch.Tensor:
    return torch.arange(N * W, dtype=torch.float32).view(N, W)


def test_flipped_bits_anywhere_in_an_sst_file_are_caught(tmp_path: Path) -> None:
    """One bit flipped at each of 24 places spread over the file (its data blocks, then
    its index, filter and footer at the end), each in a fresh copy of the DB, reopened
    so no cached block hides the flip: every read either raises SSDTierError naming the
    damaged file (RocksDB's block checksums) or returns every row exactly."""
    clean = tmp_path / "clean"
    cfg = SSDTierConfig(path=str(clean), block_cache_mb=8, write_buffer_mb=4)
    tier = SSDTier.open(cfg, row_width=W)
    tier.insert(torch.arange(N), rows())
    tier.flush()
    tier.close()
    (sst,) = sorted(clean.rglob("*.sst"))
    size = sst.stat().st_size
    places = [int(size * i / 20) for i in range(1, 20)] + [size - d for d in (200, 120, 80,
                                                                              40, 12)]
    caught = 0
    for at in places:
        db = tmp_path / f"at{at}"
        shutil.copytree(clean, db)
        hurt = db / sst.relative_to(clean)
        data = bytearray(hurt.read_bytes())
        data[at] ^= 0x10
        hurt.write_bytes(bytes(data))
        tier = None
        try:
            tier = SSDTier.open(SSDTierConfig(path=str(db), block_cache_mb=8,
                                              write_buffer_mb=4), row_width=W)
            out = torch.zeros(N, W)
            missing = tier.find(torch.arange(N), out)
        except SSDTierError as e:
            msg = str(e)
            assert "Corruption" in msg and ("MANIFEST" in msg or str(hurt) in msg), msg
            assert "damaged" in msg and "another process" not in msg, msg
            caught += 1
            continue
        finally:
            if tier is not None:
                tier.close()
        assert missing.numel() == 0 and torch.equal(out, rows()), at
    assert caught >= 19  # every flip in the data blocks at least
