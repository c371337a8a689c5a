"""
The other side of the proxy: the upstream client, how an upstream addresses
the API, and one request's exchange with it.
"""
