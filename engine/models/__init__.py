"""Model definitions built from engine.layers."""
