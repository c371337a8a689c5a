"""
What happened: one record per request, the access log, metrics, the JSON
log and the usage read from responses.
"""
