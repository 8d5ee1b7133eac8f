"""A byte-level decoder-only transformer LM for sparse training at scale.

* :mod:`experiments.lm.model`: ``TransformerLM`` (Flax linen, logical axis names),
  ``lm_config(preset)``, ``make_model``, ``init_params``, ``logical_axes``.
* :mod:`experiments.lm.data`: ``load_corpus("stdlib" | "text_dir")``, ``get_batch``,
  ``eval_windows``.
* :mod:`experiments.lm.trainer`: ``make_setup`` / ``init_state`` / ``make_train_step`` /
  ``make_eval`` / ``train`` on a ``(data, model)`` mesh, one process or many.
* :mod:`experiments.lm.launch`: starts N local processes with ``jax.distributed``.
"""
