"""
State shared by a group of processes and hosts, through Redis.
"""
