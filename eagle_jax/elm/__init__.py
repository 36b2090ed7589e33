"""ELM (arXiv 2310.04475): decode domain embeddings (movies, users) into language.

``adapter`` (E_A and soft-token injection), ``tasks`` (prompts, targets, batches), ``model``
(functional adapter and decoder, the ``ELM`` decoder wrapper), ``data`` (E_D, domain tables,
examples and their targets), ``train_loop`` (the loss and the two-stage loop), ``job`` (the run
and its report, ``load_elm``), ``evaluation`` (the SC / BC report), ``metrics`` (semantic and
behavioural consistency). EAGLE's ELM baseline is ``eagle_jax.evaluation.elm_baseline``.
"""
