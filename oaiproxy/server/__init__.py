"""
The HTTP layer: bytes in, a twisted.web Request out, and the Resource
plumbing; it knows nothing of OpenAI beyond the error shape.  The one
exception is L{oaiproxy.server.build}, the composition root that puts the
layers together into the Site.
"""
