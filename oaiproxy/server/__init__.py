"""
The HTTP layer: bytes in, a twisted.web Request out, and the Resource
plumbing; it knows nothing of OpenAI beyond the error shape.
"""
