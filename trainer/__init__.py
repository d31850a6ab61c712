"""pouta.trainer."""
