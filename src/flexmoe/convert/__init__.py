"""Conversions between flexmoe's native layout and Hugging Face's."""
