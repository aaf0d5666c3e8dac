"""Where results go besides the session folder."""
