"""Built-in optimizer plugins (entrywise update functions). The hook exists; the plugins come next."""
