"""dualssl: does a pancreas CT segmenter trained at one hospital stay accurate at hospitals it never saw?

The library (data, models, losses, engine, evaluation, export) never imports Ray; the Ray Train /
Ray Tune study lives in ``studies/``.
"""

__version__ = "0.1.0"
