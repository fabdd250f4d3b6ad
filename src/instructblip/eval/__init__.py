"""Evaluation: the paper's metrics and the held-out runner.

- ``normalization``: the official VQA answer normalisation (tables as data) and MMF's EvalAI variant;
- ``base``: ``SampleMetric``, a torchmetrics ``Metric`` over per-sample records (synced, repeated ids dropped);
- ``answers`` (VQA accuracy, top-1 accuracy, iVQA accuracy), ``cider`` (CIDEr-D via pycocoevalcap),
  ``ranking`` (Visual Dialog MRR, R@k, mean rank, NDCG), ``auroc`` (HatefulMemes);
- ``metrics``: the registry by name (``build_metric``); ``predictions``: reading and scoring predictions files;
- ``runner``: zero-shot evaluation of held-out datasets from shards; ``report``: results tables and logging;
  ``paper_results``: the paper's Table 1 numbers.
"""
