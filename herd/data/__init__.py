"""Everything that turns raw text, code, conversations and images into token streams.

- `corpora`: the embedded code corpus (Python's standard library) and readers for user data
- `synthetic`: deterministic image-text scenes drawn with Pillow
- `images`: Llama 4's image tiling and the `<|image|>` token layout
- `curation`: exact dedup, MetaCLIP balancing, quality hooks
- `documents`: one tokenized document (ids, loss mask, image tiles)
- `datasets`: whole corpora as documents, ready for the loader
- `packing`: fixed-length sequences with document ids, and the resumable sharded loader
"""
