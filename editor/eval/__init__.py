"""Evaluation: the forget/retain scorecard of a run or a checkpoint (``scorecard``), the paper's
benchmarks through lm-evaluation-harness and their relative report (``lmeval``, ``paper``)."""
