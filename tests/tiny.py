"""The tiny Hugging Face model configs the tests build (keyword arguments of transformers'
configs), so that every test means the same model by "tiny BERT" or "tiny Llama"."""

BERT = dict(
  vocab_size=64,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=32,
  num_labels=3,
)
LLAMA = dict(
  vocab_size=64,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  intermediate_size=64,
  max_position_embeddings=32,
)
