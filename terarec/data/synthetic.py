"""Criteo-shaped synthetic data with labels from a planted teacher model.

Sample layout: ``num_dense`` dense features ``I1..In`` ~ N(0, 1) and ``num_sparse``
categorical features ``C1..Cn``, each with ``values_per_feature`` keys per sample.

Keys. For feature ``f`` a rank ``r`` in ``[1, V]`` (``V = vocab_size``) is drawn from a
bounded power law P(r) ~ r^-alpha by inverting the CDF of the continuous density on
``[1, V + 1)`` (closed form for every alpha, including alpha = 1). The rank is mapped to
an id by a per-feature affine bijection of ``[0, V)`` (so popular ids are not small
numbers), and the id to a key exactly like a file reader maps integer ids:
``key = int64(mix64(id ^ salt_for(f)))``.

Teacher. With ``h_j(k) = mix64(k ^ SALT_j)`` (deterministic per key)::

    logit = teacher_bias + w . dense + sum_f a(k_f) + sum_{f<g} <u(k_f), u(k_g)>

``a(k)`` is approximately normal (sum of four 16-bit lanes of one hash), ``u(k)`` has
``teacher_dim`` uniform entries (16-bit lanes). Scales: the first-order sum has std
``teacher_scale``, the pairwise sum has std ``teacher_pairwise_scale`` (``teacher_scale``
when unset), ``|w| = teacher_scale / 2``,
so the logit std is ``1.5 * teacher_scale`` and the defaults give an oracle AUC of about
0.8. ``y ~ Bernoulli(sigmoid(logit))``; ``Rows.teacher`` = sigmoid(logit). The teacher is a
fixed function of the config (not of the seed): the seed only drives sampling.
With several keys per feature, ``a`` and ``u`` are summed over them and divided by
sqrt(values_per_feature).

Determinism: train batch ``i`` of rank ``r`` uses ``np.random.default_rng([seed, 0, r,
i])``; the eval stream's global batch ``b`` uses ``[seed, 1, b]`` and is dealt
round-robin to ranks, so the union over ranks is the same eval set for any world size.
"""

from __future__ import annotations

import math

import numpy as np

from terarec.config import DenseTransform, SyntheticConfig
from terarec.data.keys import feature_salts
from terarec.data.rows import Rows
from terarec.data.synthetic_ads import AD, SID, PlantedAds
from terarec.hashing import hash_lanes, mix64_np, salt_for

SALT_A = np.uint64(0x3C6EF372FE94F82B)
SALT_C = np.uint64(0x510E527FADE682D1)  # the conversion teacher's first-order weights
SALT_U = [np.uint64((0xA54FF53A5F1D36F1 * (j + 1)) & ((1 << 64) - 1)) for j in range(64)]
_TEACHER_SEED = 0x7E4C4E7


def sparse_names(cfg: SyntheticConfig) -> list[str]:
    """``C1..Cn``, then ``AD`` and ``SID`` with ``ads`` (``SID`` with semantic ids)."""
    names = [f"C{i}" for i in range(1, cfg.num_sparse + 1)]
    if cfg.ads is not None:
        names += [AD, SID] if cfg.ads.semantic_ids else [AD]
    return names


def dense_names(cfg: SyntheticConfig) -> list[str]:
    return [f"I{i}" for i in range(1, cfg.num_dense + 1)]


def zipf_ranks(u: np.ndarray, alpha: float, vocab: int) -> np.ndarray:
    """Bounded power-law ranks in ``[1, vocab]`` from uniforms ``u`` in [0, 1).

    Inverse CDF of the density ~ x^-alpha on ``[1, vocab + 1)``, floored. For
    ``s = 1 - alpha``: ``x = (1 + u ((V+1)^s - 1))^(1/s)``, written with expm1/log1p so it
    stays accurate as ``s -> 0``; at ``s = 0`` it is ``x = (V+1)^u``.

    Returns:
        int64 ranks, same shape as ``u``.
    """
    big_l = math.log(vocab + 1.0)
    s = 1.0 - alpha
    if abs(s) < 1e-9:
        x = np.exp(u * big_l)
    else:
        x = np.exp(np.log1p(u * math.expm1(s * big_l)) / s)
    return np.clip(x.astype(np.int64), 1, vocab)


class SyntheticGenerator:
    """Generates :class:`Rows` for one (seed, split, rank) stream.

    Args:
        cfg: the synthetic config.
        seed: run seed.
        transform: dense transform applied after the teacher saw the raw N(0, 1) values
            (synthetic dense features are already normalised; "none" is the sensible
            choice).
    """

    def __init__(
        self, cfg: SyntheticConfig, seed: int, transform: DenseTransform = DenseTransform.NONE
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.transform = transform
        self.names = sparse_names(cfg)
        self.ads = PlantedAds(cfg.ads) if cfg.ads is not None else None
        v = cfg.vocab_size
        mult, add = [], []
        for name in self.names[: cfg.num_sparse]:
            h = int(mix64_np(np.array([salt_for("synthetic-id:" + name)], dtype=np.int64))[0])
            a = (h % v) | 1 if v > 1 else 1
            while math.gcd(a, v) != 1:
                a += 2
            mult.append(a % v if v > 1 else 0)
            add.append((h >> 32) % v)
        self.mult = np.array(mult, dtype=np.uint64)[:, None]
        self.add = np.array(add, dtype=np.uint64)[:, None]
        self.salts = feature_salts(self.names[: cfg.num_sparse])[:, None]
        trng = np.random.default_rng(_TEACHER_SEED)
        w = trng.standard_normal(cfg.num_dense)
        norm = np.linalg.norm(w)
        self.w = (w / norm * 0.5 * cfg.teacher_scale if norm > 0 else w).astype(np.float32)
        nf, k, d = cfg.num_sparse, cfg.values_per_feature, cfg.teacher_dim
        # a: sum of 4 lanes of U[-1,1) has variance 4/3; want Var(sum_f a) = scale^2.
        self.a_scale = cfg.teacher_scale / math.sqrt(nf * k * 4.0 / 3.0)
        # u entries U[-1,1)*c: Var(<u_f,u_g>) = d (c^2/3)^2 per pair, nf(nf-1)/2 pairs.
        pairs = nf * (nf - 1) / 2
        pair_scale = (
            cfg.teacher_scale if cfg.teacher_pairwise_scale is None else cfg.teacher_pairwise_scale
        )
        if d > 0 and pairs > 0:
            self.u_scale = math.sqrt(3.0 * pair_scale / math.sqrt(d * pairs)) / math.sqrt(
                k
            )
        else:
            self.u_scale = 0.0

    def rows(self, rng: np.random.Generator, n: int, split: str = "train") -> Rows:
        """``n`` samples of ``split``'s stream drawn with ``rng`` (the split matters only
        with ``ads``: eval shows the held-out ads)."""
        return self.rows_and_raw(rng, n, split)[0]

    def rows_and_raw(self, rng: np.random.Generator, n: int, split: str = "train"
                     ) -> tuple[Rows, dict[str, np.ndarray]]:
        """:meth:`rows` and the raw values the keys were made from, as a file (or a
        serving request) would hold them: per feature int64 ids ``[n, k]`` (``C*``,
        ``AD``: ``[n, 1]``) or semantic-id tokens ``[n, levels]`` (``SID``)."""
        cfg = self.cfg
        nf, k = cfg.num_sparse, cfg.values_per_feature
        u = rng.random((nf, n * k))
        ranks = zipf_ranks(u, cfg.zipf_alpha, cfg.vocab_size).astype(np.uint64)
        with np.errstate(over="ignore"):
            ids = ((ranks - np.uint64(1)) * self.mult + self.add) % np.uint64(cfg.vocab_size)
        keys_u = mix64_np(ids ^ self.salts)  # [nf, n*k], == int_keys(ids[f], name)
        dense = rng.standard_normal((n, cfg.num_dense), dtype=np.float32)
        logit = np.full(n, cfg.teacher_bias, dtype=np.float32)
        if cfg.num_dense:
            logit += dense @ self.w
        ha = mix64_np(keys_u ^ SALT_A)
        a = hash_lanes(ha, 4).sum(-1) * self.a_scale  # [nf, n*k]
        logit += a.reshape(nf, n, k).sum(axis=(0, 2))
        d = cfg.teacher_dim
        if d and self.u_scale:
            parts = []
            for j in range(0, d, 4):
                hu = mix64_np(keys_u ^ SALT_U[j // 4])
                parts.append(hash_lanes(hu, min(4, d - j)))
            uf = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
            uf = uf.reshape(nf, n, k, d).sum(axis=2) * self.u_scale  # [nf, n, d]
            tot = uf.sum(axis=0)
            logit += 0.5 * ((tot * tot).sum(-1) - (uf * uf).sum(axis=(0, 2)))
        lengths = np.full((nf, n), k, dtype=np.int32)
        values = list(keys_u.view(np.int64))
        raw = {name: ids[f].view(np.int64).reshape(n, k) for f, name in
               enumerate(self.names[:nf])}
        if self.ads is not None:  # drawn after the rest: the other features stay the same
            pool = self.ads.pool(split)
            ad = pool[zipf_ranks(rng.random(n), self.ads.cfg.zipf_alpha, len(pool)) - 1]
            logit += self.ads.effect[ad]
            values.append(self.ads.ad_keys[ad])
            raw[AD] = ad.astype(np.int64).reshape(n, 1)
            per_ad = [1]
            if self.ads.cfg.semantic_ids:
                values.append(self.ads.sid_keys[ad].ravel())
                raw[SID] = self.ads.tokens[ad]
                per_ad.append(self.ads.cfg.levels)
            lengths = np.concatenate(
                [lengths, np.repeat(np.array(per_ad, np.int32)[:, None], n, axis=1)])
        prob = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(n, dtype=np.float32) < prob).astype(np.float32)
        if cfg.tasks == 2:  # drawn last: the click stream stays the single-task one
            labels, prob = self._conversion(rng, keys_u, dense, logit, labels, prob)
        if self.transform == DenseTransform.LOG1P:
            dense = np.log1p(np.maximum(dense, 0.0))
        rows = Rows(labels=labels, dense=dense, lengths=lengths, values=values,
                    teacher=prob.astype(np.float32))
        return rows, raw

    def _conversion(self, rng: np.random.Generator, keys_u: np.ndarray, dense: np.ndarray,
                    logit: np.ndarray, click: np.ndarray, p_click: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Click and conversion labels ``[n, 2]`` and their P(y=1) ``[n, 2]``.

        A conversion follows a click: P(conv | click) = sigmoid(conversion_bias + half
        the click teacher's logit + first-order weights of its own); P(conv) =
        P(click) P(conv | click).
        """
        cfg, n = self.cfg, click.shape[0]
        nf, k = cfg.num_sparse, cfg.values_per_feature
        c = np.float32(cfg.conversion_bias) + np.float32(0.5) * (logit - cfg.teacher_bias)
        if cfg.num_dense:
            c -= dense @ self.w  # the dense features push conversions the other way
        own = hash_lanes(mix64_np(keys_u ^ SALT_C), 4).sum(-1) * self.a_scale
        c += own.reshape(nf, n, k).sum(axis=(0, 2))
        p_conv = 1.0 / (1.0 + np.exp(-c))
        conv = click * (rng.random(n, dtype=np.float32) < p_conv)
        return (np.stack([click, conv.astype(np.float32)], axis=1),
                np.stack([p_click, p_click * p_conv], axis=1))

