"""How trials are chosen, run and recorded."""
