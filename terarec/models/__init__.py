"""terarec.models: CTR models over an injected pooled-embedding module.

Every model has ``forward(dense [B, D_dense], sparse KJT) -> logits [B]``;
:func:`build_model` is the only place that switches on ``ModelConfig.kind``.
"""

from terarec.models.dcn import DCNv2
from terarec.models.dlrm import DLRM
from terarec.models.factory import build_model
from terarec.models.fm import DeepFM, WideDeep

__all__ = ["DLRM", "DCNv2", "DeepFM", "WideDeep", "build_model"]
