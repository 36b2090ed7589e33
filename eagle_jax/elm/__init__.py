"""ELM (arXiv 2310.04475): decode domain embeddings (movies, users) into language.

``adapter`` (E_A and soft-token injection), ``tasks`` (prompts, targets, batches), ``trainer``
(two-stage training, the ``ELM`` decoder wrapper, the report), ``metrics`` (semantic and behavioural
consistency), ``baseline`` (EAGLE's ELM baseline: gradient ascent on the utility, then decode).
"""
