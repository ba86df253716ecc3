"""What the methods and the trainer both build on, below both: the train state and its
placement (``state``), the language-model loss (``losses``) and the fused cross-entropy
(``cross_entropy``)."""
