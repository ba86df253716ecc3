"""Data: sources -> tokenizer -> prepared (packed) rows -> sampler -> loader.

- ``sources``: what a domain is (a dict: text_glob / jsonl / parquet / hf_dataset / tfds /
  demo, one module per kind and a registry) and its documents.
- ``recipe``: what each domain of a run is for (task, mixture component, replay source,
  held out) and the sampler's slots.
- ``tokenizer``: train or load a SentencePiece model; vocab checks.
- ``prepare``: tokenize + pack documents into array_record rows with segment ids.
- ``sampler``: which rows make the global batch of (task, step), replay included.
- ``loader``: rows -> global sharded arrays.

Submodules are not imported here, so importing one does not pull in the others' deps.
"""
