"""Helpers for testing and demonstrating ltcp without the rest of the mesh."""
