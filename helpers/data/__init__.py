"""The data: the synthetic world, the tokenizer and chat template, the readers of the real formats, the Hub's
sources and downloads."""
