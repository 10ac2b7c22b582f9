"""Built-in lowering rules for aten ops. Each module is a plugin registered by entry point."""
