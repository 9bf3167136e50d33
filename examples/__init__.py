"""Example models and checkpoint makers for bntool (importable as ``examples``)."""
