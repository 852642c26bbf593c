"""Weight converters: Hugging Face directories (``hf``, key table in ``hf_keys``) and GPT-NeoX
DeepSpeed checkpoints (the ``neox`` package; its yml key table in ``neox_yml_keys``); ``progress``
is their per-tensor progress bar.

Importing these modules never imports ``pythia_jax.train``: continuing training from a converted
optimizer state is ``pythia_jax.train.continuation``.
"""
