"""Profiling: running texts through the model (``collect``, one forward-collection API shared with
the key_space calibration), streaming per-neuron statistics (``profile``), the statistics and their
file (``stats``), and data-parallel profiling under torchrun (``distributed``)."""
