"""Who is asking: API tokens, their rows and wire shapes, and the principal a request acts as."""
