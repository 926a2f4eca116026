"""Readers and writers: one small module per file format."""
