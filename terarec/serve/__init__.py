"""Serving: export a checkpoint to a bundle, score requests with it, serve it over HTTP.

``terarec export`` / :func:`~terarec.serve.export.export_bundle` write a bundle;
:class:`~terarec.serve.scorer.Scorer` scores :class:`~terarec.serve.scorer.Request`\\ s
with it; ``terarec serve`` (``service.py``) serves it. See ``docs/serving.md``.
"""

from terarec.serve.scorer import Ranking, Request, RequestError, Scorer

__all__ = ["Ranking", "Request", "RequestError", "Scorer"]
