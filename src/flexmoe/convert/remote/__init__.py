"""Modeling code copied into Hugging Face releases (never imported by flexmoe itself)."""
