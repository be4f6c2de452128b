"""The inference engine: the ONLY sampling code in picochat (chat CLI, server, training-time samples, evaluation, RL).

    engine = Engine(model, tokenizer, tool=make_tool("calculator"))
    for events in engine.generate(prompt_ids, num_samples=4, params=SamplingParams(temperature=0.8)):
        ...                                  # one Event per live row per step
    seqs, masks = engine.generate_batch(prompt_ids, num_samples=4)

How a request runs (the same code for one call and for the server's batch, serve/scheduler.py):
1. prefill: the prompt is run ONCE at batch 1 straight into a free row of the preallocated cache (several new
   requests together); that row's cache is then copied into the other num_samples-1 rows.
2. decode: all live rows advance one token per step; each row has its own position, so rows of different requests
   share a step. Finished rows leave between steps (the last live row moves into the hole).
3. per row (rows.py): the python-block state machine collects code between <|python_start|> and <|python_end|>, the
   row waits while the tool runs, and <|output_start|> result <|output_end|> is fed in one forward pass; a row ends
   on <|assistant_end|> or <|bos|>, a stop string, max_tokens or the context's end.

Modules: cache (KVCache and its views), sampling (pure functions), rows (per-row state, text stream, tool state
machine), batch (rows stepped together), core (Engine), steps (the decode-step interface: eager or compiled),
aot (the batch-1 step built ahead of time, and its cache), graphs (CUDA graphs of a step).
"""

from picochat.engine.aot import AOT_CACHE_KEEP, aot_cache_dir, aot_key
from picochat.engine.batch import Batch
from picochat.engine.cache import CacheView, KVCache, StepView
from picochat.engine.core import Engine, check_prompt
from picochat.engine.graphs import GraphedSteps, cuda_graph
from picochat.engine.rows import Event, Request, Row, TextStream
from picochat.engine.sampling import SamplingParams, penalize, sample_plain, sample_rows
from picochat.engine.steps import CompiledStep, DecodeStep, EagerStep, inference_dtype

__all__ = ["AOT_CACHE_KEEP", "Batch", "CacheView", "CompiledStep", "DecodeStep", "EagerStep", "Engine", "Event",
           "GraphedSteps", "KVCache", "Request", "Row", "SamplingParams", "StepView", "TextStream", "aot_cache_dir",
           "aot_key", "check_prompt", "cuda_graph", "inference_dtype", "penalize", "sample_plain",
           "sample_rows"]
