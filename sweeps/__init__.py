"""Ray Tune sweeps over vpns trials: one script per figure; the machinery in ``sweep`` (entry
point), ``flags``, ``trainable``, ``schedulers``, ``tracking``, ``resources`` and ``results``."""
