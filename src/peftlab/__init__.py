"""peftlab: which parameter-efficient fine-tuning method should I use, and why?

The package holds all logic of the pipeline; the Snakemake workflow only calls it.
Nothing here imports snakemake, so every stage can be run from a notebook or a test.
"""

__version__ = "0.1.0"
