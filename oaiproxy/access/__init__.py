"""
Who may use the proxy, and how much: client keys, allow-lists and limits.
"""
