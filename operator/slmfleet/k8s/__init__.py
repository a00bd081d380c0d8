"""The only code that talks to the API server: reads, server-side apply, status patches."""
