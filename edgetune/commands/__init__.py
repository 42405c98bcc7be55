"""One module per CLI command. Keep them thin: parse options, call a stage function, emit."""
