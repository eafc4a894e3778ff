"""Reference trainers (LLaVA-style and contrastive); arrives with its issues."""
