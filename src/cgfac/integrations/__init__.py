"""Integrations with training frameworks, each an optional extra imported only when used.

* :mod:`cgfac.integrations.transformers` (``pip install cgfac[hf]``): ``PreconditionerCallback``
  for Hugging Face's ``Trainer``, and the output/loss readers ``cgfac.optim`` needs there.
* :mod:`cgfac.integrations.lightning` (``pip install cgfac[lightning]``): ``PreconditionerCallback``
  for Lightning's ``Trainer``.

``import cgfac`` imports neither framework.
"""
