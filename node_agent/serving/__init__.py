"""What the agent serves over HTTP: the KServe v2 protocol (codec and routes), the generate
extension, and the responses both share. The only layer of the agent that imports aiohttp's
web server."""
