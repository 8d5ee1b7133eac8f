"""Experiment configs: each file's ``get_config()`` returns an ml_collections ConfigDict.

``base.get_config()`` lists every field with its meaning; the other files override a few.
"""
