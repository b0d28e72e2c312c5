"""Prefect flows over the `dinov2` stage commands, and the local services that run them."""
