"""Client library and `digit-client` CLI."""
