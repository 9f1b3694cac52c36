"""tokenforge: metrics (torch + torchmetrics only; never imports a stage or ``data``).

- ``metrics.codebook``: ``CodebookUsage``, the epoch/DDP-wide code histogram.
- ``metrics.reconstruction``: ``ReconstructionMetrics`` (MSE, PSNR, SSIM, optional LPIPS).
- ``metrics.lpips_offline``: ``load_lpips``, LPIPS from local torchvision weights only.
- ``metrics.fid``: labelled FID on offline Inception or domain-classifier features; Inception Score.
- ``metrics.precision_recall``: k-NN precision/recall (Kynkäänniemi et al. 2019).
- ``metrics.domain_classifier``: the small classifier behind domain FID, and its training loop.
- ``metrics.weights``: where pretrained files are looked for, and ``MissingWeightsError``.

Submodules are imported explicitly (``from metrics.fid import domain_fid``) so that using one
metric does not load the feature networks of the others.
"""
