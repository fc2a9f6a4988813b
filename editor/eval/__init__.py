"""Evaluation: the forget/retain scorecard of a run or a checkpoint (``scorecard``), the paper's
benchmark scorers (``scorers``: GSM8K, MBPP, MLQA, MMLU) and the lm-evaluation-harness command
(``lmeval``)."""
