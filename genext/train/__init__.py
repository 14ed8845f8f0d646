"""genext.train: the ``genext train`` command, its data, its evaluation and the autoencoder demos.

The top layer of the package: it trains the models of :mod:`genext.models` and nothing in the
library imports it. Its third-party needs (scikit-learn, scikit-image, matplotlib, tqdm,
safetensors) are the optional extra ``genext[train]``; importing this package itself needs none of
them, its modules raise an ImportError naming the extra when one is missing.

- :mod:`genext.train.data`: scikit-learn's digits (fixed stratified split) and scikit-image's
  photographs cut into patches (fixed held-out images), and the resumable batch stream;
- :mod:`genext.train.loop`: the training loop (checkpoints that resume exactly, DDP, plots);
- :mod:`genext.train.evaluate`: the digit classifier, PCA baseline, codebook statistics and the
  Frechet distance in the classifier's feature space;
- :mod:`genext.train.tasks`: the registry of what can be trained (``vae``, ``vqvae``, the GANs,
  ``ddpm``, ``ldm``).

Run ``genext train vae`` or ``python -m genext.train vae``.
"""

from __future__ import annotations

__all__: list[str] = []
