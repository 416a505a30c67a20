"""Command modules of the wclip CLI."""
