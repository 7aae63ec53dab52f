"""Sub-commands of the `salr` CLI; each module has `register(subparsers)`."""
