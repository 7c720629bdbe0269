"""Reference clients: programs that talk to the server as a phone app does."""
