"""Sharded-stack support: the head's weight however a stack holds it (head.py), vocabulary-parallel losses (vocab.py)."""
