"""pouta.edge."""
