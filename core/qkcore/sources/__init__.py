"""Where models, tokenizers and documents come from (hub, local files, or built offline)."""
