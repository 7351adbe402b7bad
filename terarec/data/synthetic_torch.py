"""The synthetic generator on a torch device: same keys and teacher as ``synthetic.py``.

:class:`TorchSyntheticGenerator` draws the samples of
:class:`~terarec.data.synthetic.SyntheticGenerator` with torch ops on any device (no numpy,
no host sync, no Python loop over samples or features), so a GPU can make its own training
data at far more than the ~0.25 M samples/s of the numpy generator on one core.

What is identical to the numpy generator (tested):

* rank -> key: ``id = ((rank - 1) * mult + add) % V`` with the numpy generator's
  constants and its uint64 wraparound (bit for bit for every ``V <= 2**62``; the config
  allows ``V <= 1e9``, where nothing wraps), then ``key = int64(mix64(id ^ salt_for(f)))``;
* uniform -> rank: the same closed-form inverse CDF in float64 (see ``zipf_ranks``);
  ranks can differ only where ``x`` is within a rounding of an integer (libm vs torch);
* the teacher as a function of (keys, dense): same hashes, lanes and scales, computed in
  float32; sums run in another order, so logits differ by float32 rounding only.

What is not: the random streams. torch's generator is not numpy's, so the same seed gives
other samples with the same distribution. Batch ``i`` of a stream should be drawn with
``torch.Generator(device).manual_seed(batch_seed(seed, split_id, rank, i))``; the same
inputs give the same batch on the same device type (CPU and CUDA streams differ).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from terarec.config import DenseTransform, SyntheticConfig
from terarec.data.batch import Batch
from terarec.data.synthetic import SALT_A, SALT_U, SyntheticGenerator
from terarec.hashing import MIX_M1, MIX_M2, as_int64, mix64_np

log = logging.getLogger("terarec.data")

_MASK64 = (1 << 64) - 1
_MAX_VOCAB = 1 << 62  # unsigned mod below needs (V - 1) + (2**64 % V) < 2**63
_NO_WRAP_VOCAB = 3_037_000_499  # floor(sqrt(2**63 - 1)): (V-1)**2 + (V-1) < 2**63 below


def _i64(x: int) -> int:
    """The int64 with the same bits as the 64-bit unsigned ``x``."""
    return as_int64(x & _MASK64)


def batch_seed(seed: int, split_id: int, rank: int, index: int) -> int:
    """Seed for ``torch.Generator.manual_seed`` of one batch of one stream.

    Chained splitmix64 finalizer over the tuple (each value read as 64-bit unsigned).

    Args:
        seed: run seed. split_id: 0 train, 1 eval. rank: the rank (0 for eval's global
            batch numbering). index: the batch index.

    Returns:
        a non-negative int below ``2**63``.
    """
    h = 0x9E3779B97F4A7C15
    for v in (seed, split_id, rank, index):
        h = int(mix64_np(np.array([(h ^ v) & _MASK64], dtype=np.uint64))[0])
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
    return h >> 1


def zipf_ranks_torch(u: torch.Tensor, alpha: float, vocab: int) -> torch.Tensor:
    """``zipf_ranks`` in torch: bounded power-law ranks in ``[1, vocab]``.

    Args:
        u: float64 uniforms in [0, 1), any shape and device.
        alpha: the exponent; |1 - alpha| < 1e-9 takes the ``x = (V+1)^u`` branch.
        vocab: ``V``.

    Returns:
        int64 ranks, shape of ``u``.
    """
    u = u.to(torch.float64)
    big_l = math.log(vocab + 1.0)
    s = 1.0 - alpha
    if abs(s) < 1e-9:
        x = torch.exp(u * big_l)
    else:
        x = (u * math.expm1(s * big_l)).log1p_().div_(s).exp_()
    return x.to(torch.int64).clamp_(1, vocab)


def _srl_(x: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bits into ``out`` (torch's ``>>`` is arithmetic)."""
    torch.bitwise_right_shift(x, s, out=out)
    return out.bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(z: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``mix64_torch`` in place on int64 ``z`` with scratch ``buf`` (same shape).

    Same bits as ``mix64_torch`` and ``mix64_np``; in place because fresh CPU allocations
    of this size each cost page faults that take longer than the arithmetic.
    """
    z.bitwise_xor_(_srl_(z, 30, buf)).mul_(_i64(MIX_M1))
    z.bitwise_xor_(_srl_(z, 27, buf)).mul_(_i64(MIX_M2))
    return z.bitwise_xor_(_srl_(z, 31, buf))


def _lane(h: torch.Tensor, j: int, buf: torch.Tensor) -> torch.Tensor:
    """16-bit lane ``j <= 3`` of int64 ``h`` as a uniform in [-1, 1): float32, shape of ``h``.

    ``buf`` is int64 scratch. Lane ``j`` is bits ``16j .. 16j+15`` (logical shift, mask).
    """
    return _srl_(h, 16 * j, buf).bitwise_and_(0xFFFF).to(torch.float32) * (2.0 / 65536.0) - 1.0


class SyntheticTensors(NamedTuple):
    """One block of synthetic samples as device tensors (``F`` features, ``k`` keys each).

    Attributes:
        dense: float32 ``[n, D]``, after the dense transform.
        keys: int64 ``[F, n * k]``; row ``f`` holds sample 0's ``k`` keys, then sample 1's...
        labels: float32 ``[n]`` in {0, 1}.
        teacher: float32 ``[n]``, the planted P(y = 1).
    """

    dense: torch.Tensor
    keys: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor


class TorchSyntheticGenerator:
    """The numpy :class:`SyntheticGenerator`'s samples drawn with torch ops on ``device``.

    Args:
        cfg: the synthetic config (``vocab_size`` up to ``2**62`` works).
        seed: run seed (kept for the caller; the teacher does not depend on it).
        transform: dense transform applied after the teacher saw the raw values.
        device: where every tensor lives and every op runs.
        graphs: on CUDA, replay each batch size's sample ops as one CUDA graph.
    """

    def __init__(
        self,
        cfg: SyntheticConfig,
        seed: int,
        transform: DenseTransform = DenseTransform.NONE,
        device: torch.device | str = "cpu",
        graphs: bool = True,
    ) -> None:
        if not 1 <= cfg.vocab_size <= _MAX_VOCAB:
            raise ValueError(f"vocab_size: must be in [1, 2**62], got {cfg.vocab_size}")
        ref = SyntheticGenerator(cfg, seed, transform)
        self.cfg, self.seed, self.transform = cfg, seed, transform
        self.device = torch.device(device)
        self.names = ref.names
        v = cfg.vocab_size

        def col(a: np.ndarray) -> torch.Tensor:  # uint64 [F, 1] -> int64 [F, 1] on device
            return torch.tensor([[_i64(int(x))] for x in a[:, 0]], device=self.device)

        self.mult, self.add, self.salts = col(ref.mult), col(ref.add), col(ref.salts)
        self._wrap_fix = (1 << 64) % v  # 2**64 mod V, for the uint64 wraparound
        self.w = torch.from_numpy(ref.w).to(self.device)  # float32 [D]
        self.a_scale, self.u_scale = ref.a_scale, ref.u_scale
        self._salt_a = _i64(int(SALT_A))
        n_groups = (cfg.teacher_dim + 3) // 4
        self._salt_u = [_i64(int(x)) for x in SALT_U[:n_groups]]  # int64 per group
        self.graphs = graphs
        self._graphs: dict[int, _SampleGraph] = {}  # per batch size

    def ranks_to_keys(self, ranks: torch.Tensor) -> torch.Tensor:
        """Keys of ranks, exactly as the numpy generator maps them.

        Args:
            ranks: int64 ``[F, m]`` in ``[1, V]`` (row ``f`` is feature ``f``), on device.

        Returns:
            int64 ``[F, m]`` keys ``int64(mix64(id ^ salt_for(f)))``.
        """
        v = self.cfg.vocab_size
        z = (ranks - 1).mul_(self.mult).add_(self.add)  # wraps mod 2**64 like numpy's uint64
        if v <= _NO_WRAP_VOCAB:  # nothing wraps: z >= 0
            ids = z.remainder_(v)
        else:  # the unsigned value of a negative z is z + 2**64
            m = torch.remainder(z, v)
            ids = torch.where(z < 0, m.add(self._wrap_fix).remainder_(v), m)
        return _mix64_(ids.bitwise_xor_(self.salts), torch.empty_like(ids))

    def teacher_logit(self, keys: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """The planted teacher's logit for given keys and raw (untransformed) dense values.

        ``bias + dense @ w + sum_f a(k_f) + 0.5 * (|sum_f u_f|^2 - sum_f |u_f|^2)``, float32,
        with ``a`` and ``u`` from the 16-bit lanes of ``mix64(key ^ salt)`` as in numpy.

        Args:
            keys: int64 ``[F, n * k]`` (layout of :class:`SyntheticTensors`).
            dense: float32 ``[n, D]``, the raw N(0, 1) values.

        Returns:
            float32 ``[n]``.
        """
        cfg = self.cfg
        nf, k, d = cfg.num_sparse, cfg.values_per_feature, cfg.teacher_dim
        n = keys.shape[1] // k
        logit = torch.full((n,), cfg.teacher_bias, dtype=torch.float32, device=keys.device)
        if cfg.num_dense:
            logit += dense @ self.w
        buf = torch.empty_like(keys)
        h = _mix64_(keys ^ self._salt_a, buf)
        a = _lane(h, 0, buf)  # the four lanes are multiples of 2**-15: their sum is exact
        for j in range(1, 4):
            a += _lane(h, j, buf)
        logit += a.mul_(self.a_scale).view(nf, n, k).sum(dim=(0, 2))
        if d and self.u_scale:
            uf = torch.empty((d, nf, n * k), dtype=torch.float32, device=keys.device)
            for g, salt in enumerate(self._salt_u):  # lane group g: entries 4g .. 4g+3 of u
                h = _mix64_(torch.bitwise_xor(keys, salt, out=h), buf)
                for j in range(min(4, d - 4 * g)):
                    uf[4 * g + j] = _lane(h, j, buf)
            uf = uf.view(d, nf, n, k).sum(dim=3).mul_(self.u_scale)  # [d, F, n]
            tot = uf.sum(dim=1)  # [d, n]
            logit += 0.5 * (tot.square_().sum(0) - uf.square_().sum(dim=(0, 1)))
        return logit

    def draw(self, gen: torch.Generator, n: int,
             out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random draws of ``n`` samples, in draw order: key uniforms float64
        ``[F, n * k]``, raw dense N(0, 1) float32 ``[n, D]``, label uniforms float32 ``[n]``
        (into ``out`` when given)."""
        cfg, dev = self.cfg, self.device
        shapes = ((cfg.num_sparse, n * cfg.values_per_feature), (n, cfg.num_dense), (n,))
        if out is None:
            out = (torch.empty(shapes[0], dtype=torch.float64, device=dev),
                   torch.empty(shapes[1], dtype=torch.float32, device=dev),
                   torch.empty(shapes[2], dtype=torch.float32, device=dev))
        u, dense, lab = out
        torch.rand(shapes[0], generator=gen, dtype=torch.float64, device=dev, out=u)
        torch.randn(shapes[1], generator=gen, dtype=torch.float32, device=dev, out=dense)
        torch.rand(shapes[2], generator=gen, dtype=torch.float32, device=dev, out=lab)
        return u, dense, lab

    def from_draws(self, u: torch.Tensor, dense: torch.Tensor, lab: torch.Tensor
                   ) -> SyntheticTensors:
        """The samples of the draws of :meth:`draw` (pure tensor ops, no host sync: what
        a CUDA graph replays)."""
        cfg = self.cfg
        keys = self.ranks_to_keys(zipf_ranks_torch(u, cfg.zipf_alpha, cfg.vocab_size))
        prob = torch.sigmoid(self.teacher_logit(keys, dense))
        labels = (lab < prob).float()
        if self.transform == DenseTransform.LOG1P:
            dense = torch.log1p(dense.clamp_min(0.0))
        return SyntheticTensors(dense=dense, keys=keys, labels=labels, teacher=prob)

    def sample(self, gen: torch.Generator, n: int) -> SyntheticTensors:
        """``n`` samples drawn with ``gen`` (a generator on ``self.device``).

        On CUDA (unless ``graphs`` was turned off) the ~120 small kernels of
        :meth:`from_draws` run as one CUDA graph per batch size, captured at the first
        batch of that size: the same kernels on the same inputs, so the same samples,
        at a fraction of the host time (the host feeds the training step meanwhile).
        """
        graph = self._graph(n)
        if graph is None:
            return self.from_draws(*self.draw(gen, n))
        self.draw(gen, n, out=graph.inputs)
        graph.graph.replay()
        # the graph's outputs are overwritten by the next replay: the batch gets copies
        return SyntheticTensors(*(t.clone() for t in graph.outputs))

    def _graph(self, n: int) -> Optional[_SampleGraph]:
        if not self.graphs or self.device.type != "cuda":
            return None
        if n not in self._graphs:
            try:
                self._graphs[n] = _SampleGraph.capture(self, n)
            except Exception as e:  # noqa: BLE001 - the eager ops give the same samples
                log.warning("synthetic generator: CUDA graph capture failed (%s); drawing "
                            "batches with eager ops", e)
                self.graphs = False
                return None
        return self._graphs[n]

    def batch(
        self, gen: torch.Generator, n: int, keys: list[str], position: Optional[dict] = None
    ) -> Batch:
        """``n`` samples as a :class:`Batch` on ``self.device`` (see :meth:`to_batch`)."""
        return self.to_batch(self.sample(gen, n), keys, position)

    def to_batch(
        self, t: SyntheticTensors, keys: list[str], position: Optional[dict] = None
    ) -> Batch:
        """A :class:`Batch` laid out as ``Rows.to_batch`` lays it out, without a copy.

        Args:
            t: samples from :meth:`sample`.
            keys: the KJT's feature names, one per sparse feature, in feature order.
            position: the stream's resume state after this batch.

        Returns:
            Batch whose KJT has values ``t.keys.reshape(-1)`` (feature-major, ``[F*n*k]``),
            int32 lengths ``[F * n]`` all ``values_per_feature`` and stride ``n``.
        """
        nf, n = t.keys.shape[0], t.labels.shape[0]
        if len(keys) != nf:
            raise ValueError(f"keys: {len(keys)} names for {nf} sparse features")
        lengths = torch.full(
            (nf * n,), self.cfg.values_per_feature, dtype=torch.int32, device=t.keys.device
        )
        per_key = [n * self.cfg.values_per_feature] * nf  # known: no device sync later
        kjt = KeyedJaggedTensor(
            keys=list(keys), values=t.keys.reshape(-1), lengths=lengths, stride=n,
            length_per_key=per_key, offset_per_key=[i * per_key[0] for i in range(nf + 1)],
        )
        return Batch(
            dense=t.dense, sparse=kjt, labels=t.labels, position=position, teacher_prob=t.teacher
        )


class _SampleGraph(NamedTuple):
    """:meth:`TorchSyntheticGenerator.from_draws` for one batch size as a CUDA graph:
    ``draw`` writes into ``inputs``, ``replay`` refreshes ``outputs``."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    outputs: SyntheticTensors

    @staticmethod
    def capture(gen: TorchSyntheticGenerator, n: int) -> _SampleGraph:
        g = torch.Generator(device=gen.device).manual_seed(0)
        inputs = gen.draw(g, n)
        side = torch.cuda.Stream(gen.device)
        side.wait_stream(torch.cuda.current_stream(gen.device))
        with torch.cuda.stream(side):  # warm-up (library handles) off the capture
            gen.from_draws(*inputs)
        torch.cuda.current_stream(gen.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the training step) may use CUDA meanwhile
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            outputs = gen.from_draws(*inputs)
        return _SampleGraph(graph, inputs, outputs)
