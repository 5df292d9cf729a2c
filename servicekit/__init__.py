"""What every HTTP service here needs, free of any domain: config, tokens, middlewares, JSON logs,
TLS and serving."""
