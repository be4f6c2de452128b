"""The `transformers` config of an exported picochat model (`picochat export --format hf` copies this file next to the
weights; `AutoConfig.from_pretrained(DIR, trust_remote_code=True)` loads it). Self-contained: it must not import
picochat, which the machine that loads the export may not have.

The fields are picochat's ModelConfig fields under their own names, resolved (no 0 = derived values left);
`attribute_map` gives transformers' generic names (num_hidden_layers, hidden_size, ...) to the tools that read them:
lm-evaluation-harness takes the context length from `max_position_embeddings`.
"""

from transformers import PretrainedConfig


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"
    attribute_map = {"num_hidden_layers": "depth", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, depth=4, n_embd=256, head_dim=64, n_head=4, n_kv_head=4, vocab_size=8192, sequence_len=512,
                 logit_softcap=15.0, rope_base=10000.0, window_pattern="L", short_window=0, value_embeds=False,
                 resid_scalars=False, **kwargs):
        self.depth = depth
        self.n_embd = n_embd
        self.head_dim = head_dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.vocab_size = vocab_size
        self.sequence_len = sequence_len
        self.logit_softcap = logit_softcap
        self.rope_base = rope_base
        self.window_pattern = window_pattern
        self.short_window = short_window
        self.value_embeds = value_embeds
        self.resid_scalars = resid_scalars
        kwargs.setdefault("tie_word_embeddings", False)  # picochat's wte and lm_head are separate matrices
        super().__init__(**kwargs)

    def layer_window(self, layer: int) -> int:
        """Keys a query of `layer` sees (0 = all before it): S layers of window_pattern get the short window, L layers
        and the last layer see everything (picochat ModelConfig.layer_window)."""
        ch = self.window_pattern[layer % len(self.window_pattern)]
        if ch == "L" or layer == self.depth - 1:
            return 0
        return self.short_window or max(1, self.sequence_len // 4)
