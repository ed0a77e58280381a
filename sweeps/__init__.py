"""Ray Tune sweeps over vpns trials: one script per figure; the machinery in ``sweep`` (entry
point), ``flags``, ``preflight``, ``trainable`` (a trial under Tune), ``attempt`` (one attempt of
a trial in one process, the same for one worker or each of N), ``data_parallel``, ``placement``,
``schedulers``, ``tracking``, ``resources`` and ``results``."""
