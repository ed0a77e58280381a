"""Ray Tune sweeps over vpns trials; one script per figure, shared machinery in ``common``."""
