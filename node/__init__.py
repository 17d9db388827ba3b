"""The product shell: API, payments, chain client, registry sync, settlement scheduling, CLI."""
