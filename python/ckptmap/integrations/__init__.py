"""Adapters that let existing projects use ckptmap without code changes (see `mmengine`)."""
