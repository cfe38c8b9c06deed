"""Finetuning recipes from the book: spam classification (chapter 6) and instructions (chapter 7)."""
