"""Stage two: priors over the discrete codes of a stage-one tokenizer.

``prior.py`` (the shared LightningModule base, ``load_prior``), ``ar.py`` (GPT-style autoregressive
prior with KV-cached sampling), ``maskgit.py`` (bidirectional masked-token prior), ``sampling.py``
(temperature / top-k / top-p / classifier-free guidance shared by all samplers).
Modules are imported explicitly (``from stage2.ar import ARPrior``) so that importing the package
stays cheap.
"""
