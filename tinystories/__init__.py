"""tinystories: the whole TinyStories job (Eldan & Li, 2023) in one package.

Prepare the data, train a small GPT from scratch, evaluate it, write stories with it and export it
to Hugging Face. The command line is `tinystories` (or `python -m tinystories`); see README.md.

Nothing heavy is imported here, so `tinystories --help` stays instant.
"""

__version__ = "0.1.0"
