"""
The process: the twistd plugin's options and service, life under a service
manager, and the worker group.
"""
