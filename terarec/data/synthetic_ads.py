"""Synthetic ads with a planted semantic-id hierarchy (opt-in ``data.synthetic.ads``).

Every sample shows one ad. Ad ``a`` (an id in ``[0, num_ads)``) has a semantic id: a
path of ``levels`` tokens, token ``l`` = ``mix64(a ^ SALT_TOKEN[l]) % codebook_size`` (ads
sharing a token at level 1 form a coarse group, sharing levels 1-2 a finer one, ...,
as the codebooks of TIGER / GR4AD-style semantic ids do). Two features carry it:

* ``AD``: the ad's id (one key, ``int_keys(a, "AD")``, as a file's integer column);
* ``SID``: one key per prefix of the path (``keys.semantic_id_keys``, ``levels`` keys).

The teacher adds the ad's effect to its logit::

    effect(a) = scale * (sqrt((1 - own_share) / levels) * sum_l e(prefix_l(a))
                         + sqrt(own_share) * e(a))

where ``e`` is a unit-variance value hashed from a prefix key (or the ad's id): most of
an ad's effect is its path's, shared with the ads of the same prefixes. A share
``held_out`` of the ads (chosen by a hash of the id) never appears in the train stream;
the eval stream shows only those, so eval measures what a model knows of ads it never
saw: from ``AD`` nothing (their keys were never trained), from ``SID`` the prefixes they
share with seen ads. Popularity: Zipf(``zipf_alpha``) over each set's ads in a fixed
shuffled order. Like the rest of the teacher, all of this is a function of the config,
not of the seed.
"""

from __future__ import annotations

import math

import numpy as np

from terarec.config import AdsConfig
from terarec.data.keys import int_keys, semantic_id_keys
from terarec.hashing import hash_lanes, mix64_np

AD, SID = "AD", "SID"  # the feature names
SALT_TOKEN = [np.uint64((0x6A09E667F3BCC909 * (j + 3)) & ((1 << 64) - 1)) for j in range(16)]
SALT_EFFECT = np.uint64(0x510E527FADE682D1)
SALT_HELD = np.uint64(0x1F83D9ABFB41BD6B)
_ORDER_SEED = 0xAD5


def _unit(h: np.ndarray) -> np.ndarray:
    """A unit-variance value per uint64 hash (four 16-bit lanes, summed)."""
    return hash_lanes(mix64_np(h ^ SALT_EFFECT), 4).sum(-1) / math.sqrt(4.0 / 3.0)


class PlantedAds:
    """The ads of one :class:`AdsConfig`: their tokens, keys, effects and split.

    Attributes:
        tokens: int64 ``[num_ads, levels]`` each ad's semantic id.
        sid_keys: int64 ``[num_ads, levels]`` the ``SID`` keys of each ad.
        ad_keys: int64 ``[num_ads]`` the ``AD`` key of each ad.
        effect: float32 ``[num_ads]`` each ad's term of the teacher logit.
        held: bool ``[num_ads]`` ads kept out of the train stream.
    """

    def __init__(self, cfg: AdsConfig) -> None:
        self.cfg = cfg
        n, lv = cfg.num_ads, cfg.levels
        ids = np.arange(n, dtype=np.uint64)
        self.tokens = np.stack(
            [(mix64_np(ids ^ SALT_TOKEN[j]) % np.uint64(cfg.codebook_size)) for j in range(lv)],
            axis=1).astype(np.int64)
        self.sid_keys = semantic_id_keys(self.tokens.ravel(), np.full(n, lv), SID).reshape(n, lv)
        self.ad_keys = int_keys(ids, AD)
        path = _unit(self.sid_keys.view(np.uint64)).sum(axis=1)
        own = _unit(self.ad_keys.view(np.uint64))
        self.effect = (cfg.scale * (math.sqrt((1.0 - cfg.own_share) / lv) * path
                                    + math.sqrt(cfg.own_share) * own)).astype(np.float32)
        u = (mix64_np(ids ^ SALT_HELD) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        self.held = u < cfg.held_out
        if cfg.held_out > 0 and not self.held.any():
            self.held[0] = True  # a held-out share rounds to at least one ad
        if self.held.all():
            self.held[0] = False
        order = np.random.default_rng(_ORDER_SEED)
        self.train_ads = order.permutation(np.flatnonzero(~self.held))  # by popularity
        self.eval_ads = order.permutation(np.flatnonzero(self.held))

    def pool(self, split: str) -> np.ndarray:
        """The ads of ``split``'s stream, most popular first (eval: the held-out ones,
        when there are)."""
        held = split in ("eval", "valid") and len(self.eval_ads)
        return self.eval_ads if held else self.train_ads
