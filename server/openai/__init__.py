"""The OpenAI API: chat and legacy completions, embeddings, models (`/v1/...`)."""
