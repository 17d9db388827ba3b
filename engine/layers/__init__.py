"""Building blocks of the Llama-family model: one small module per layer kind."""
