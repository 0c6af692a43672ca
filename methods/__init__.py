"""Continual-learning strategy plugins: each file here is one method, with a yaml under
conf/method/ (``base.py`` names the interface they implement); ``shared/`` holds what several of
them build on."""
