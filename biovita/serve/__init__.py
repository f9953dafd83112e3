"""Serving a model: identify and search on Ray Serve with a web page (`biovita serve`)."""
