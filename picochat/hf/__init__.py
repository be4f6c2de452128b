"""Files `picochat export --format hf` copies next to the exported weights: a `transformers` config and modeling file
that load with trust_remote_code=True. They import transformers, so nothing in picochat imports them."""
