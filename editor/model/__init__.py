"""The base model: the architecture table (``arch``), loading config / tokenizer / weights with the
device and dtype policy (``loading``), and the special token ids every stage agrees on (``tokens``)."""
