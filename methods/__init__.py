"""Continual-learning strategy plugins; each one a file and a yaml under conf/method/."""
