"""The methods' math, pure functions on tensors (no files, no modules, no forwards):
``neuron_adjust`` (selection, NA constants, permutation; the pruning baseline's selection),
``key_space`` (the box, the linear detector's shares) and ``calibrate`` (choosing the box or
fitting the detector from probe keys)."""

SIGMA_FLOOR = 1e-6  # every σ (both methods) is floored at this before use
