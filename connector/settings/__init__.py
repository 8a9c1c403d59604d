"""Connector settings: the model and its validation, their storage, what a change sets in
motion, and the generated secrets."""
