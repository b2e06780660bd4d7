"""The config: where it lives, its schema, the checks no schema can make."""
