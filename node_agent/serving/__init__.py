"""What the agent serves over HTTP: the KServe v2 protocol (codec and routes) and the generate
extension. The only layer of the agent that imports aiohttp's web server."""
