"""Data: sources -> tokenizer -> prepared (packed) rows -> sampler -> loader.

- ``sources``: what a domain is (a dict: text_glob / jsonl / tfds / demo) and its documents.
- ``tokenizer``: train or load a SentencePiece model; vocab checks.
- ``prepare``: tokenize + pack documents into array_record rows with segment ids.
- ``sampler``: which rows make the global batch of (task, step), replay included.
- ``loader``: rows -> global sharded arrays.

Submodules are not imported here, so importing one does not pull in the others' deps.
"""
